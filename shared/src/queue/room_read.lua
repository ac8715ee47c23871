-- Reads up to `count` tasks for a worker that feeds itself from the room: what the stream
-- holds unread first (tasks without a class are the most urgent), then the room's next
-- tasks, fed to the stream and read in the same step, so no other worker takes them.
-- Beacons read on the way are dropped here: this reader is feeding already.
-- KEYS: 1 stream
-- ARGV: 1 group, 2 consumer, 3 count, then tenant and weight pairs (tenants with more than
--       one task per turn)
-- Returns {1 if the room still has tasks else 0, entries read, entries fed and read}.
local stream, group, consumer, want = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local read = function(n)
  local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS',
    stream, '>')
  return got and got[1][2] or {}
end
local first, beacons = {}, {}
for _, e in ipairs(read(want)) do
  local f = e[2]
  if #f == 2 and f[1] == 'room' then
    beacons[#beacons + 1] = e[1]
  else
    first[#first + 1] = e
  end
end
if #beacons > 0 then
  redis.call('XACK', stream, group, unpack(beacons))
  redis.call('XDEL', stream, unpack(beacons))
end
local weights = {}
for i = 4, #ARGV, 2 do
  weights[ARGV[i]] = tonumber(ARGV[i + 1])
end
local room = room_of(stream)
local fed = 0
while fed < want - #first and room_feed_one(stream, room, weights) do
  fed = fed + 1
end
local second = {}
if fed > 0 then
  second = read(fed)
end
local more = redis.call('EXISTS', room)
if more == 1 then
  room_beacon(stream, group, room)
end
return {more, first, second}
