-- Enqueues tasks at once, for a producer that knows them (llmq submit, llmq batch): each into
-- the stream, into `delayed` (a `run_at` ahead) or straight into the room (a class: the same
-- place a worker would sort it into after an XADD, without the read and the sort); and, for
-- a batch that can be resumed, how many of its tasks are in, in the same script, so that a
-- rerun skips exactly those.
-- KEYS: 1 stream, 2 delayed
-- ARGV: 1 group, then per task: where ('s' stream, 'd' delayed, 'r' room), a (the due time in
-- ms, or the priority), b (the tenant, '' for none), envelope; last, the batch's progress
-- mark ('' for none; a name under the queue's prefix), its value and its TTL (ms)
-- Returns how many went in.
local stream, delayed = KEYS[1], KEYS[2]
-- The room's functions, made at the first task that goes into it.
local n, r = 0, nil
local mark = #ARGV - 2
for i = 2, mark - 1, 4 do
  local where, env = ARGV[i], ARGV[i + 3]
  if where == 'd' then
    redis.call('ZADD', delayed, ARGV[i + 1], env)
  elseif where == 'r' then
    r = r or room()
    r.push(stream, ARGV[i + 1], ARGV[i + 2], env, false)
  else
    redis.call('XADD', stream, '*', 'task', env)
  end
  n = n + 1
end
if r then
  r.beacon(stream, ARGV[1], r.of(stream))
end
if ARGV[mark] ~= '' then
  redis.call('SET', string.sub(stream, 1, -7) .. ARGV[mark], ARGV[mark + 1], 'PX', ARGV[mark + 2])
end
return n
