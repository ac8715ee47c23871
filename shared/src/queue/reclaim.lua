-- Takes over entries idle longer than the visibility timeout (their worker died or hung).
-- An entry delivered more than max deliveries times is a poison task: it goes to dead.
-- KEYS: 1 stream, 2 dead
-- ARGV: 1 group, 2 consumer, 3 min idle (ms), 4 count, 5 max deliveries, 6 now (ms),
--   7 the end of the dead letter's reason, after "the task was delivered N"
-- Returns two flat arrays of id, delivery count, task payload (or false): the claimed
-- entries this consumer should run now, and the ones that went to dead.
local stream, dead = KEYS[1], KEYS[2]
local group, consumer, max_deliveries = ARGV[1], ARGV[2], tonumber(ARGV[5])
local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], '0-0', 'COUNT', ARGV[4])
local out, poison, dead_out = {}, {}, {}
for _, entry in ipairs(claimed[2]) do
  local id, fields = entry[1], entry[2]
  local task = false
  if fields then
    for j = 1, #fields, 2 do
      if fields[j] == 'task' then task = fields[j + 1] end
    end
  end
  local info = redis.call('XPENDING', stream, group, id, id, 1)
  local deliveries = info[1] and tonumber(info[1][4]) or 1
  if deliveries > max_deliveries then
    redis.call('XADD', dead, '*', 'task', task or '', 'error',
      'the task was delivered ' .. deliveries .. ARGV[7],
      'class', 'poison', 'attempts', tostring(deliveries), 'failed_at', ARGV[6], 'entry_id', id)
    poison[#poison + 1] = id
    dead_out[#dead_out + 1] = id
    dead_out[#dead_out + 1] = deliveries
    dead_out[#dead_out + 1] = task
  else
    out[#out + 1] = id
    out[#out + 1] = deliveries
    out[#out + 1] = task
  end
end
if #poison > 0 then
  redis.call('XACK', stream, group, unpack(poison))
  redis.call('XDEL', stream, unpack(poison))
end
return {out, dead_out}
