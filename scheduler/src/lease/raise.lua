-- Moves the fencing token past `floor`, the highest token Postgres has seen, for the lease
-- holder only. Needed when Redis lost the counter (flushed, or restored from an old snapshot):
-- without it every new token would be refused by Postgres.
-- KEYS: 1 lease, 2 fence
-- ARGV: 1 holder id, 2 fencing token, 3 floor
-- Returns the holder's new token, or -1 when the lease expired or is someone else's.
if not is_holder() then
  return -1
end
if (tonumber(redis.call('GET', KEYS[2])) or 0) < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[3])
end
return redis.call('INCR', KEYS[2])
