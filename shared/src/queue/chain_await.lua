-- An approval step's task: settles it (a person decides, not a model) and leaves the step
-- awaiting approval until `llmq chain approve|reject` or its deadline, in one step.
-- KEYS: 1 stream, 2 delayed, 3 dead, 4 result key, 5 steps, 6 the queue's approvals
-- ARGV: 1 group, 2 consumer, 3 result ttl (s), 4 now (ms), 5 entry id, 6 kind, 7 record,
--       8 envelope, 9 a, 10 b (settle.lua), 11 chain id, 12 step, 13 deadline (ms)
-- Returns 1 applied, 0 fenced (the entry is no longer this consumer's).
local stream = KEYS[1]
if not settle_one(stream, KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[5], ARGV[6],
    ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[4], tonumber(ARGV[3])) then
  return 0
end
local raw = redis.call('HGET', KEYS[5], ARGV[12])
if raw then
  local s = cjson.decode(raw)
  if s.status == 'queued' then
    s.status = 'awaiting_approval'
    s.deadline = tonumber(ARGV[13])
    redis.call('HSET', KEYS[5], ARGV[12], cjson.encode(s))
    redis.call('ZADD', KEYS[6], ARGV[13], ARGV[11] .. '\t' .. ARGV[12])
  end
end
return 1
