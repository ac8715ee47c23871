-- Enqueues tasks that have a class straight into the room, for a producer that knows their
-- class (llmq submit, llmq batch): the same place a worker would sort them into after an
-- XADD, without the read and the sort.
-- KEYS: 1 stream
-- ARGV: 1 group, then per task: priority, tenant ('' for none), envelope
-- Returns how many went in.
local stream = KEYS[1]
local n = 0
for i = 2, #ARGV, 3 do
  room_push(stream, ARGV[i], ARGV[i + 1], ARGV[i + 2], false)
  n = n + 1
end
if n > 0 then
  room_beacon(stream, ARGV[1], room_of(stream))
end
return n
