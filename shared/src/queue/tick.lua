-- Enqueues one tick of a recurring task exactly once, for the lease holder only: marks the
-- tick (SET NX with a TTL), adds the task to the queue's stream and records the tick as the
-- task's last, all in one step.
-- KEYS: 1 lease, 2 fence, 3 tick marker, 4 queue stream, 5 duties
-- ARGV: 1 holder id, 2 fencing token, 3 marker ttl (ms), 4 envelope json, 5 duties field,
--       6 tick (ms)
-- Returns 1 enqueued, 0 the tick was enqueued before, -1 not the holder.
if not is_holder() then
  return -1
end
local last = tonumber(redis.call('HGET', KEYS[5], ARGV[5])) or 0
if tonumber(ARGV[6]) > last then
  redis.call('HSET', KEYS[5], ARGV[5], ARGV[6])
end
if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[3]) then
  return 0
end
redis.call('XADD', KEYS[4], '*', 'task', ARGV[4])
return 1
