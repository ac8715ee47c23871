-- Finishes a batch of tasks in one call: for each, checks that this consumer still holds the
-- entry (fencing: a worker whose claim was taken over must not write), applies the outcome,
-- then acks and deletes every entry that was still held.
-- KEYS: 1 stream, 2 delayed, 3 dead, then one result key per item
-- ARGV: 1 group, 2 consumer, 3 result ttl (s), 4 now (ms), 5 and 6 the lowest and highest
--   entry id of the batch, then 6 per item:
--   entry id, kind, record json, envelope json, a, b
--   kind ok:      store the record
--   kind retry:   a = due (ms): envelope to delayed; store the record
--   kind dead:    a = error, b = class: envelope to dead; store the record
--   kind release: envelope back to the stream, no record
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
    local rkey = KEYS[4 + i]
    if kind == 'retry' then
      redis.call('ZADD', delayed, ARGV[base + 4], env)
    elseif kind == 'dead' then
      local attempts = record ~= '' and cjson.decode(record)['attempts'] or 0
      redis.call('XADD', dead, '*', 'task', env, 'error', ARGV[base + 4], 'class', ARGV[base + 5],
        'attempts', tostring(attempts), 'failed_at', now, 'entry_id', id)
    elseif kind == 'release' then
      redis.call('XADD', stream, '*', 'task', env)
    end
    if record ~= '' then
      redis.call('SET', rkey, record, 'EX', ttl)
    end
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
