-- Writes one field of the duties hash, for the lease holder only.
-- KEYS: 1 lease, 2 fence, 3 duties
-- ARGV: 1 holder id, 2 fencing token, 3 field, 4 value, 5 `always` or `if_absent`
-- Returns 1 written, 0 not written (if_absent and the field exists), -1 not the holder.
if not is_holder() then
  return -1
end
if ARGV[5] == 'if_absent' then
  return redis.call('HSETNX', KEYS[3], ARGV[3], ARGV[4])
end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
return 1
