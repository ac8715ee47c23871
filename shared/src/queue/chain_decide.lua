-- Decides an approval step, once: approved, it succeeds and its chain moves on; rejected, it
-- fails like any step (its descendants are cancelled).
-- KEYS: 1 the queue's fence (see fence.lua), 2 stream, 3 chain, 4 steps, 5 tasks, 6 the
--       queue's approvals
-- ARGV: 1 the lease holder's id, or '' for a person (not fenced), 2 its fencing token,
--       3 chain id, 4 step, 5 `succeeded` or `failed`, 6 state fields as json, 7 now (ms),
--       8 the prefix of the chain's wait sets, 9 how long an ended chain's keys live (s)
-- Returns 1 decided, -1 no such chain or step, -2 the step is not awaiting approval (never
-- was, or was decided before), -3 the scheduler that asked no longer holds the lease. Unless
-- fenced off, the step leaves the approvals either way: an entry whose step was cancelled or
-- whose chain expired is not tried again.
if ARGV[1] ~= '' and not is_holder() then return -3 end
redis.call('ZREM', KEYS[6], ARGV[3] .. '\t' .. ARGV[4])
local raw = redis.call('HGET', KEYS[4], ARGV[4])
if not raw then return -1 end
if cjson.decode(raw).status ~= 'awaiting_approval' then return -2 end
advance(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[4], ARGV[5], ARGV[6], ARGV[8], ARGV[7],
  ARGV[9])
return 1
