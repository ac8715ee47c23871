-- Replaces a reservation's estimate with what the call really used.
-- KEYS: 1 micro-dollars this month, 2 token window, 3 the token window's sum, 4 the token
--       pace (reserve.lua), 5 the tokens a call uses (the pace's mean), 6 the pace's slack
-- ARGV: 1 reservation id, 2 estimated tokens, 3 actual tokens, 4 micro-dollars to add
--       (actual minus estimate; may be negative), 5 the token pace's ms per token (0: none),
--       6 the tokens the reservation charged the pace (a fraction)
redis.call('INCRBY', KEYS[1], ARGV[4])
local old = ARGV[1] .. ':' .. ARGV[2]
local at = redis.call('ZSCORE', KEYS[2], old)
local more = tonumber(ARGV[3]) - tonumber(ARGV[2])
if at then
  redis.call('ZREM', KEYS[2], old)
  redis.call('ZADD', KEYS[2], at, ARGV[1] .. ':' .. ARGV[3])
  redis.call('INCRBY', KEYS[3], more)
end
-- The mean learns from calls that used tokens (a refused or failed call used none).
local per, used, charged = tonumber(ARGV[5]), tonumber(ARGV[3]), tonumber(ARGV[6])
local mean = per > 0 and tonumber(redis.call('GET', KEYS[5]) or '')
if per > 0 and used > 0 then
  mean = mean and mean + (used - mean) / 8 or used
  redis.call('SET', KEYS[5], string.format('%.1f', mean), 'PX', 86400000)
end
-- The pace moves by what its charge missed: a call that used less gives its time back.
local tat = per > 0 and tonumber(redis.call('GET', KEYS[4]) or '')
if tat then
  local moved = (used - charged) * per
  redis.call('SET', KEYS[4], string.format('%.3f', tat + moved), 'KEEPTTL')
  -- But callers already told their slots in the line come at them, not at the earlier
  -- pace, and the time between would be lost: while calls give time back, a grant may
  -- count from as far behind the pace as they gave (the slack, reserve.lua), up to a
  -- call's step, and less in reserve.lua, so that two calls never go out at once for it.
  local cap = (mean or charged) * per
  if moved < 0 and cap > 0 then
    local slack = math.min(tonumber(redis.call('GET', KEYS[6]) or '0') - moved, cap)
    redis.call('SET', KEYS[6], string.format('%.3f', slack), 'PX', math.ceil(2 * cap + 1000))
  end
end
return 1
