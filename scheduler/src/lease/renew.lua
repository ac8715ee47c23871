-- Extends the lease only if this holder still has it (compare and extend).
-- KEYS: 1 lease, 2 fence
-- ARGV: 1 holder id, 2 fencing token, 3 lease (ms)
-- Returns 1, or -1 when the lease expired or is someone else's.
if not is_holder() then
  return -1
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
