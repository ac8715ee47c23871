-- Moves due delayed tasks to the stream.
-- KEYS: 1 delayed, 2 stream
-- ARGV: 1 now (ms), 2 limit
-- Returns {moved, score of the next delayed task or -1}.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, task in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'task', task)
end
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, nxt[2] and tonumber(nxt[2]) or -1}
