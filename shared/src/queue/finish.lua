-- Finishes a batch of tasks in one call: for each, checks that this consumer still holds the
-- entry (fencing: a worker whose claim was taken over must not write), applies the outcome,
-- then acks and deletes every entry that was still held.
-- KEYS: 1 stream, 2 delayed, 3 dead, then one result key per item
-- ARGV: 1 group, 2 consumer, 3 result ttl (s), 4 now (ms), 5 and 6 the lowest and highest
--   entry id of the batch, then 6 per item:
--   entry id, kind, record json, envelope json, a, b (see settle.lua)
-- Returns one integer per item: 1 applied, 0 fenced (no longer ours).
local stream, delayed, dead = KEYS[1], KEYS[2], KEYS[3]
local group, consumer, ttl, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local done, out = {}, {}
-- One XPENDING for the whole batch: what this consumer still holds in the batch's range.
local mine = {}
for _, p in ipairs(redis.call('XPENDING', stream, group, ARGV[5], ARGV[6], 1000000, consumer)) do
  mine[p[1]] = true
end
local n = (#ARGV - 6) / 6
for i = 0, n - 1 do
  local base = 7 + i * 6
  local id, kind, record, env = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  if mine[id] then
    mine[id] = nil
    settle(stream, delayed, dead, KEYS[4 + i], id, kind, record, env, ARGV[base + 4],
      ARGV[base + 5], now, ttl)
    done[#done + 1] = id
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if #done > 0 then
  redis.call('XACK', stream, group, unpack(done))
  redis.call('XDEL', stream, unpack(done))
end
return out
