-- Replaces a reservation's estimate with what the call really used.
-- KEYS: 1 micro-dollars this month, 2 token window, 3 the token window's sum
-- ARGV: 1 reservation id, 2 estimated tokens, 3 actual tokens, 4 micro-dollars to add
--       (actual minus estimate; may be negative)
redis.call('INCRBY', KEYS[1], ARGV[4])
local old = ARGV[1] .. ':' .. ARGV[2]
local at = redis.call('ZSCORE', KEYS[2], old)
if at then
  redis.call('ZREM', KEYS[2], old)
  redis.call('ZADD', KEYS[2], at, ARGV[1] .. ':' .. ARGV[3])
  redis.call('INCRBY', KEYS[3], tonumber(ARGV[3]) - tonumber(ARGV[2]))
end
return 1
