-- Finishes a batch of chain steps' tasks and moves their chains along, in one call: for
-- each, settles the task as finish.lua does (if this consumer still holds it), then
-- advance.lua records the step and what it unblocks.
-- KEYS: 1 stream, 2 delayed, 3 dead, then 4 per item: result key, chain, steps, tasks
-- ARGV: 1 group, 2 consumer, 3 result ttl (s), 4 now (ms), then 10 per item: entry id, kind,
--       record, envelope, a, b (settle.lua), step, outcome (succeeded, failed or cancelled),
--       step state fields as json (provider, model, cost_usd, summary, error), the prefix of
--       the chain's wait sets
-- Returns one integer per item: 1 applied, 0 fenced (the entry is no longer this consumer's).
local stream, ttl, now = KEYS[1], tonumber(ARGV[3]), ARGV[4]
local out = {}
local n = (#ARGV - 4) / 10
for i = 0, n - 1 do
  local a, k = 5 + i * 10, 4 + i * 4
  if settle_one(stream, KEYS[2], KEYS[3], KEYS[k], ARGV[1], ARGV[2], ARGV[a], ARGV[a + 1],
      ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], now, ttl) then
    advance(stream, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[a + 6], ARGV[a + 7],
      ARGV[a + 8], ARGV[a + 9], now, ttl)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
