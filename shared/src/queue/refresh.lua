-- Resets the idle time of entries this consumer still holds, so a long call is not taken over.
-- KEYS: 1 stream
-- ARGV: 1 group, 2 consumer, 3.. entry ids
-- Returns the ids this consumer no longer holds (taken over, or finished): their claims are
-- lost, and no call may start on them.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local held, lost = {}, {}
for i = 3, #ARGV do
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
