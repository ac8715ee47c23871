-- Enqueues one tick of a recurring task exactly once, for the lease holder only: marks the
-- tick (SET NX with a TTL) and adds the task to the queue's stream in one step. The
-- scheduler records the tick as the task's last itself (its own keys are in another slot).
-- KEYS: 1 the queue's fence (see fence.lua), 2 tick marker, 3 queue stream
-- ARGV: 1 holder id, 2 fencing token, 3 marker ttl (ms), 4 envelope json
-- Returns 1 enqueued, 0 the tick was enqueued before, -1 not the holder.
if not is_holder() then
  return -1
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[3]) then
  return 0
end
redis.call('XADD', KEYS[3], '*', 'task', ARGV[4])
return 1
