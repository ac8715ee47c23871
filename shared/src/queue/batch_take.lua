-- Takes up to `max` of a group's waiting tasks, oldest first, into a new batch, for the lease
-- holder only; no more than `max bytes` of requests (at least one task).
-- A batch that was taken but never sent (its scheduler died) is taken again by `resend`.
-- KEYS: 1 the queue's fence (see fence.lua), 2 the group's waiting set, 3 the groups set,
--       4 the batch record, 5 open batches
-- ARGV: 1 holder, 2 token, 3 provider/model, 4 max, 5 batch id, 6 now (ms), 7 provider,
--       8 model, 9 the prefix of task batch hashes, 10 max bytes
-- Returns -1 (not the holder) or, per task taken: its id, body, deadline (ms). Not its
-- envelope: sending needs only the request, and both carry the whole prompt.
if not is_holder() then
  return -1
end
local ids = redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[4]) - 1)
local cap, size = tonumber(ARGV[10]), 0
local out, taken = {}, {}
for _, id in ipairs(ids) do
  local key = ARGV[9] .. id
  local f = redis.call('HMGET', key, 'state', 'body', 'deadline')
  if f[1] == 'waiting' then
    local n = string.len(f[2] or '')
    if #taken > 0 and size + n > cap then
      break
    end
    size = size + n
    redis.call('ZREM', KEYS[2], id)
    redis.call('HSET', key, 'state', 'sent', 'batch', ARGV[5])
    taken[#taken + 1] = id
    out[#out + 1] = id
    out[#out + 1] = f[2]
    out[#out + 1] = f[3]
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
if redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[3])
end
if #taken > 0 then
  redis.call('HSET', KEYS[4], 'group', ARGV[3], 'provider', ARGV[7], 'model', ARGV[8],
    'created', ARGV[6], 'tasks', table.concat(taken, ','), 'state', 'submitting')
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
end
return out
