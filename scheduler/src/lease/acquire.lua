-- Takes the lease if nobody holds it, and bumps the fencing token in the same step.
-- KEYS: 1 lease, 2 fence
-- ARGV: 1 holder id, 2 lease (ms)
-- Returns the holder's new fencing token, or 0 when another instance holds the lease.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
