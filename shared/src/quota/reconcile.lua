-- Replaces a reservation's estimate with what the call really used.
-- KEYS: 1 micro-dollars this month, 2 token window, 3 the token window's sum, 4 the token
--       pace (reserve.lua), 5 the tokens a call uses (the pace's mean)
-- ARGV: 1 reservation id, 2 estimated tokens, 3 actual tokens, 4 micro-dollars to add
--       (actual minus estimate; may be negative), 5 the token pace's ms per token (0: none),
--       6 the tokens the reservation charged the pace
redis.call('INCRBY', KEYS[1], ARGV[4])
local old = ARGV[1] .. ':' .. ARGV[2]
local at = redis.call('ZSCORE', KEYS[2], old)
local more = tonumber(ARGV[3]) - tonumber(ARGV[2])
if at then
  redis.call('ZREM', KEYS[2], old)
  redis.call('ZADD', KEYS[2], at, ARGV[1] .. ':' .. ARGV[3])
  redis.call('INCRBY', KEYS[3], more)
end
-- The pace moves by what its charge missed: a call that used less gives its time back. The
-- mean learns from calls that used tokens (a refused or failed call used none).
local per, used = tonumber(ARGV[5]), tonumber(ARGV[3])
local tat = per > 0 and tonumber(redis.call('GET', KEYS[4]) or '')
if tat then
  redis.call('SET', KEYS[4], string.format('%.3f', tat + (used - tonumber(ARGV[6])) * per),
    'KEEPTTL')
end
if per > 0 and used > 0 then
  local mean = tonumber(redis.call('GET', KEYS[5]) or '')
  mean = mean and mean + (used - mean) / 8 or used
  redis.call('SET', KEYS[5], string.format('%.1f', mean), 'PX', 86400000)
end
return 1
