-- Settles a tenant's reservation (tenant_reserve.lua): its estimate is replaced by what the
-- call cost and used, or given back whole for a call never sent, and it is no longer in
-- flight. The day and month are the reservation's, whenever it settles.
-- KEYS: 1 micro-dollars that day, 2 micro-dollars that month, 3 token window, 4 the token
--       window's sum, 5 calls in flight
-- ARGV: 1 reservation id, 2 estimated tokens, 3 actual tokens, 4 micro-dollars to add
--       (actual minus estimate; may be negative), 5 1 when the day's budget counted it,
--       6 1 when the month's did
local more = tonumber(ARGV[4])
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], more)
end
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('INCRBY', KEYS[2], more)
end
local old = ARGV[1] .. ':' .. ARGV[2]
local at = redis.call('ZSCORE', KEYS[3], old)
if at then
  redis.call('ZREM', KEYS[3], old)
  redis.call('ZADD', KEYS[3], at, ARGV[1] .. ':' .. ARGV[3])
  redis.call('INCRBY', KEYS[4], tonumber(ARGV[3]) - tonumber(ARGV[2]))
end
redis.call('ZREM', KEYS[5], ARGV[1])
return 1
