-- Records what became of a batch (the provider's id once sent), for the lease holder only.
-- KEYS: 1 the queue's fence (see fence.lua), 2 the batch record, 3 open batches
-- ARGV: 1 holder, 2 token, 3 batch id, then field, value pairs; no pairs: drop the record.
-- Returns -1 (not the holder), 0 (no such batch) or 1.
if not is_holder() then
  return -1
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
if #ARGV == 3 then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[3])
  return 1
end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
return 1
