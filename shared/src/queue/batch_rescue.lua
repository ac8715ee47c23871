-- Sends back to the stream, to be called as usual, the tasks of a queue whose batches no
-- scheduler sends any more (the batcher key is gone) once their deadline is an hour away:
-- waiting ones, and those in a batch nobody follows. Run by workers; does nothing while a
-- scheduler sends batches, which settles them itself.
-- KEYS: 1 the batcher key, 2 the groups set, 3 open batches, 4 stream
-- ARGV: 1 now (ms), 2 the margin before a deadline (ms), 3 the prefix of task batch hashes,
--       4 the prefix of waiting sets, 5 the prefix of batch records, 6 how long a settled
--       task's hash lives past its deadline (ms), 7 tasks looked at per group at most
-- Returns how many tasks went back to the stream.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local now, margin, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[7])
local n = 0
local function back(id, key, deadline, env, why)
  batch_back(KEYS[4], key, 'fallback', 'reason', why, env, deadline, now, tonumber(ARGV[6]))
  n = n + 1
end
for _, group in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local waiting = ARGV[4] .. group
  for _, id in ipairs(redis.call('ZRANGE', waiting, 0, limit - 1)) do
    local key = ARGV[3] .. id
    local f = redis.call('HMGET', key, 'state', 'env', 'deadline')
    local deadline = tonumber(f[3] or '0') or 0
    if f[1] ~= 'waiting' then
      redis.call('ZREM', waiting, id)
    elseif deadline - margin <= now then
      redis.call('ZREM', waiting, id)
      back(id, key, deadline, f[2], 'no scheduler sent its batch before its deadline came near')
    end
  end
  if redis.call('ZCARD', waiting) == 0 then
    redis.call('SREM', KEYS[2], group)
  end
end
for _, batch in ipairs(redis.call('ZRANGE', KEYS[3], 0, limit - 1)) do
  local record = ARGV[5] .. batch
  local tasks = redis.call('HGET', record, 'tasks')
  if not tasks then
    redis.call('ZREM', KEYS[3], batch)
  else
    for id in string.gmatch(tasks, '[^,]+') do
      local key = ARGV[3] .. id
      local f = redis.call('HMGET', key, 'state', 'batch', 'env', 'deadline')
      local deadline = tonumber(f[4] or '0') or 0
      if f[1] == 'sent' and f[2] == batch and deadline - margin <= now then
        back(id, key, deadline, f[3], 'no scheduler followed its batch before its deadline came near')
      end
    end
  end
end
return n
