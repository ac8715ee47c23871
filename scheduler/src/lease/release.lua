-- Gives the lease up, only if this holder still has it (compare and delete).
-- KEYS: 1 lease, 2 fence
-- ARGV: 1 holder id, 2 fencing token
-- Returns 1, or -1 when the lease expired or is someone else's.
if not is_holder() then
  return -1
end
redis.call('DEL', KEYS[1])
return 1
