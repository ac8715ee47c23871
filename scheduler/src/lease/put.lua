-- Sets a key of the scheduler's own (the routing stats), for the lease holder only.
-- KEYS: 1 lease, 2 fence, 3 the key
-- ARGV: 1 holder id, 2 fencing token, 3 value
-- Returns 1 written, -1 not the holder.
if not is_holder() then
  return -1
end
redis.call('SET', KEYS[3], ARGV[3])
return 1
