-- Ends tasks of a batch, for the lease holder only: each gets its answer, is handed to a
-- normal call ('fallback') or is taken out by a cancel ('cancelled'), and goes back to the
-- stream, where a worker finishes it as any task (a cancelled one, cancelled). A task that is no longer this batch's (settled before) is left alone, so settling
-- again after a crash changes nothing.
-- KEYS: 1 the queue's fence (see fence.lua), 2 stream, 3 the batch record, 4 open batches
-- ARGV: 1 holder, 2 token, 3 batch id, 4 how long a settled task's hash lives past the
--       task's deadline (ms), 5 the prefix of task batch hashes, 6 'close' (drop the record),
--       'abandon' (keep it, to read what the provider still bills) or '', 7 now (ms), then
--       per task: id, 'answered', 'fallback' or 'cancelled', the answer or the reason
-- Returns -1 (not the holder) or how many tasks went back to the stream.
if not is_holder() then
  return -1
end
local n = 0
local now = tonumber(ARGV[7])
for i = 8, #ARGV, 3 do
  local key = ARGV[5] .. ARGV[i]
  local f = redis.call('HMGET', key, 'state', 'batch', 'env', 'deadline')
  if f[1] == 'sent' and f[2] == ARGV[3] then
    local field = 'answer'
    if ARGV[i + 1] ~= 'answered' then
      field = 'reason'
    end
    batch_back(KEYS[2], key, ARGV[i + 1], field, ARGV[i + 2], f[3], tonumber(f[4] or '0') or 0,
      now, tonumber(ARGV[4]))
    n = n + 1
  end
end
if ARGV[6] == 'close' then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[3])
elseif ARGV[6] == 'abandon' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HSET', KEYS[3], 'state', 'abandoned', 'abandoned', ARGV[7])
end
return n
