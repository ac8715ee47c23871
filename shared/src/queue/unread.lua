-- Hands back entries a worker read but will not run (their queue was paused meanwhile):
-- each entry this consumer still holds goes back to the stream with its fields as they
-- were, then is acked and deleted, all in one step. No delivery is counted against it.
-- KEYS: 1 stream
-- ARGV: 1 group, 2 consumer, then the entry ids
-- Returns how many entries went back.
local back = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, ARGV[2])
  if #held == 1 then
    local entry = redis.call('XRANGE', KEYS[1], id, id)
    if #entry == 1 then
      redis.call('XADD', KEYS[1], '*', unpack(entry[1][2]))
    end
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    back = back + 1
  end
end
return back
