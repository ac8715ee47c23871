-- Deletes archived dead letters from a queue's dead stream, for the lease holder only.
-- KEYS: 1 the queue's fence (see fence.lua), 2 dead stream
-- ARGV: 1 holder id, 2 fencing token, 3... entry ids
-- Returns how many entries were deleted, or -1 when not the holder.
if not is_holder() then
  return -1
end
if #ARGV < 3 then
  return 0
end
return redis.call('XDEL', KEYS[2], unpack(ARGV, 3))
