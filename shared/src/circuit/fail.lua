-- Counts a failed call against one circuit; opens it after enough failures in a row, and
-- at once when it had already tripped (a failed probe).
-- KEYS: 1 open, 2 tripped, 3 probe, 4 failures
-- ARGV: 1 failures that open it, 2 cooldown (ms), 3 the error, 4 now (ms),
--       5 how long `tripped` is kept (ms)
-- Returns 1 when this failure opened the circuit, else 0.
local function open(why)
  local text = ARGV[4] .. '|' .. why
  redis.call('SET', KEYS[1], text, 'PX', ARGV[2])
  redis.call('SET', KEYS[2], why, 'PX', ARGV[5])
  redis.call('DEL', KEYS[3], KEYS[4])
  return 1
end

if redis.call('EXISTS', KEYS[2]) == 1 then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    -- Already open (a call that started before it opened): nothing to add.
    return 0
  end
  return open('the probe call failed: ' .. ARGV[3])
end
local n = redis.call('INCR', KEYS[4])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
if n >= tonumber(ARGV[1]) then
  return open(n .. ' failures in a row; the last: ' .. ARGV[3])
end
return 0
