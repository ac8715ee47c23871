-- Cancels a running chain: every step not yet ended is cancelled (a worker that reads its
-- task later acks it without a call), a step awaiting approval leaves the queue's approvals,
-- and the chain's state becomes `cancelled`; its keys, wait sets included, expire.
-- KEYS: 1 chain, 2 steps, 3 tasks, 4 the queue's approvals
-- ARGV: 1 now (ms), 2 how long an ended chain's keys live (s), 3 chain id, 4 the prefix of
--       the chain's wait sets
-- Returns the number of steps cancelled, or -1 when there is no such chain, -2 when it is
-- not running.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state ~= 'running' then return -2 end
local flat = redis.call('HGETALL', KEYS[2])
local n = 0
for i = 1, #flat, 2 do
  local s = cjson.decode(flat[i + 1])
  if s.status == 'awaiting_approval' then
    redis.call('ZREM', KEYS[4], ARGV[3] .. '\t' .. flat[i])
  end
  if s.status ~= 'succeeded' and s.status ~= 'failed' and s.status ~= 'cancelled' then
    s.status = 'cancelled'
    s.error = 'cancelled by an operator'
    redis.call('HSET', KEYS[2], flat[i], cjson.encode(s))
    n = n + 1
  end
  redis.call('EXPIRE', ARGV[4] .. flat[i], ARGV[2])
end
redis.call('HINCRBY', KEYS[1], 'pending', -n)
redis.call('HINCRBY', KEYS[1], 'cancelled', n)
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ARGV[2])
end
return n
