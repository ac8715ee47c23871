-- Finishes one chain step's task and moves its chain along, in one step: settles the task
-- as finish.lua does, then advance.lua records the step and what it unblocks.
-- KEYS: 1 stream, 2 delayed, 3 dead, 4 result key, 5 chain, 6 steps, 7 tasks
-- ARGV: 1 group, 2 consumer, 3 result ttl (s), 4 now (ms), 5 entry id, 6 kind, 7 record,
--       8 envelope, 9 a, 10 b (settle.lua), 11 step, 12 outcome (succeeded, failed or
--       cancelled), 13 step state fields as json (provider, model, cost_usd, summary, error),
--       14 the prefix of the chain's wait sets
-- Returns 1 applied, 0 fenced (the entry is no longer this consumer's).
local stream = KEYS[1]
if not settle_one(stream, KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[5], ARGV[6],
    ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[4], tonumber(ARGV[3])) then
  return 0
end

advance(stream, KEYS[5], KEYS[6], KEYS[7], ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[4],
  ARGV[3])
return 1
