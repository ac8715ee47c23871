-- Replaces a reservation's estimate with what the call really used.
-- KEYS: 1 micro-dollars this month, 2 token window, 3 the token window's sum, 4 the token
--       pace (reserve.lua)
-- ARGV: 1 reservation id, 2 estimated tokens, 3 actual tokens, 4 micro-dollars to add
--       (actual minus estimate; may be negative), 5 the token pace's ms per token (0: none)
redis.call('INCRBY', KEYS[1], ARGV[4])
local old = ARGV[1] .. ':' .. ARGV[2]
local at = redis.call('ZSCORE', KEYS[2], old)
local more = tonumber(ARGV[3]) - tonumber(ARGV[2])
if at then
  redis.call('ZREM', KEYS[2], old)
  redis.call('ZADD', KEYS[2], at, ARGV[1] .. ':' .. ARGV[3])
  redis.call('INCRBY', KEYS[3], more)
end
-- The pace moves by what the estimate missed: a call that used less gives its time back.
local per = tonumber(ARGV[5])
local tat = per > 0 and tonumber(redis.call('GET', KEYS[4]) or '')
if tat then
  redis.call('SET', KEYS[4], string.format('%.3f', tat + more * per), 'KEEPTTL')
end
return 1
