-- Resets the idle time of entries this consumer still holds, so a long call is not taken over.
-- KEYS: 1 stream, 2 the queue's live workers (zset of when each was last seen)
-- ARGV: 1 group, 2 consumer, 3 now (ms), 4.. entry ids
-- The consumer is also seen now, so a takeover can tell a worker that keeps its other
-- claims (alive) from one that died.
-- Returns the ids this consumer no longer holds (taken over, or finished): their claims are
-- lost, and no call may start on them.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], consumer)
local held, lost = {}, {}
for i = 4, #ARGV do
  if #redis.call('XPENDING', stream, group, ARGV[i], ARGV[i], 1, consumer) == 1 then
    held[#held + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #held > 0 then
  -- JUSTID: resets the idle time without counting another delivery.
  local args = {stream, group, consumer, 0}
  for _, id in ipairs(held) do args[#args + 1] = id end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
end
return lost
