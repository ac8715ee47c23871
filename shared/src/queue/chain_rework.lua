-- A review rejected the work it reviewed and may send it back: settles the review's task
-- (its verdict is its result), then puts the step to redo and every step from it to the
-- review (the review included) into their next round, in one step. The step to redo gets
-- the findings in its prompt (its task carries them).
-- KEYS: 1 stream, 2 delayed, 3 dead, 4 result key, 5 chain, 6 steps, 7 tasks, then one wait
--       set per step to rerun, in order
-- ARGV: 1 group, 2 consumer, 3 result ttl (s), 4 now (ms), 5 entry id, 6 kind, 7 record,
--       8 envelope, 9 a, 10 b (settle.lua), then 6 per step to rerun: name, task id,
--       envelope json, round, parents it waits for joined by ',', parents already succeeded
-- Returns 1 applied, 0 fenced (the entry is no longer this consumer's).
local stream = KEYS[1]
if not settle_one(stream, KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[5], ARGV[6],
    ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[4], tonumber(ARGV[3])) then
  return 0
end
if redis.call('HGET', KEYS[5], 'state') ~= 'running' then
  return 1
end
local n = (#ARGV - 10) / 6
for i = 0, n - 1 do
  local base = 11 + i * 6
  rerun_step(stream, KEYS[5], KEYS[6], KEYS[7], KEYS[8 + i], ARGV[base], ARGV[base + 1],
    ARGV[base + 2], ARGV[base + 3], ARGV[base + 4], ARGV[base + 5])
end
return 1
