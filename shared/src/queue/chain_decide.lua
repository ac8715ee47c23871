-- Decides an approval step, once: approved, it succeeds and its chain moves on; rejected, it
-- fails like any step (its descendants are cancelled).
-- KEYS: 1 stream, 2 chain, 3 steps, 4 tasks, 5 the queue's approvals
-- ARGV: 1 chain id, 2 step, 3 `succeeded` or `failed`, 4 state fields as json, 5 now (ms),
--       6 the prefix of the chain's wait sets, 7 how long an ended chain's keys live (s)
-- Returns 1 decided, -1 no such chain or step, -2 the step is not awaiting approval (never
-- was, or was decided before). Either way the step leaves the approvals: an entry whose
-- step was cancelled or whose chain expired is not tried again.
redis.call('ZREM', KEYS[5], ARGV[1] .. '\t' .. ARGV[2])
local raw = redis.call('HGET', KEYS[3], ARGV[2])
if not raw then return -1 end
if cjson.decode(raw).status ~= 'awaiting_approval' then return -2 end
advance(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4], ARGV[6], ARGV[5],
  ARGV[7])
return 1
