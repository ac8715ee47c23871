-- Sends a task a worker holds to wait for a provider batch.
-- KEYS: 1 stream, 2 the task's batch hash, 3 its group's waiting set, 4 the groups set,
--       5 the batcher key
-- ARGV: 1 consumer group, 2 consumer, 3 entry id, 4 task id, 5 provider/model, 6 envelope,
--       7 request body, 8 deadline (ms), 9 generation, 10 now (ms)
-- Returns 1 (waiting: the entry is acked and deleted), 0 (the task went to a batch before:
-- this entry is a copy, acked and deleted), 2 (no scheduler sends batches now: call the
-- model) or -1 (this consumer no longer holds the entry: nothing done).
local stream = KEYS[1]
if #redis.call('XPENDING', stream, ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then
  return -1
end
local parked = 0
if redis.call('EXISTS', KEYS[2]) == 0 then
  if redis.call('EXISTS', KEYS[5]) == 0 then
    return 2
  end
  redis.call('HSET', KEYS[2], 'state', 'waiting', 'group', ARGV[5], 'env', ARGV[6],
    'body', ARGV[7], 'deadline', ARGV[8], 'gen', ARGV[9])
  redis.call('ZADD', KEYS[3], ARGV[10], ARGV[4])
  redis.call('SADD', KEYS[4], ARGV[5])
  parked = 1
end
redis.call('XACK', stream, ARGV[1], ARGV[3])
redis.call('XDEL', stream, ARGV[3])
return parked
