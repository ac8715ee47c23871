-- Reads up to `count` tasks for a worker that feeds itself from the room: what the stream
-- holds unread first (tasks without a class are the most urgent), then the room's next
-- tasks, fed to the stream and read in the same step, so no other worker takes them.
-- Beacons read on the way are dropped here: this reader is feeding already.
-- KEYS: 1 stream
-- ARGV: 1 group, 2 consumer, 3 count, then tenant and weight pairs (tenants with more than
--       one task per turn)
-- Returns {1 if the room still has tasks to feed else 0, entries read, entries fed and read,
-- and when every tenant left in the room is held at its limits: the first hold's end (ms),
-- else 0}. No beacon is left then: readers would wake to feed nothing; the reader looks
-- again when the hold ends, and a task that comes meanwhile leaves a beacon.
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
local holds = room_holds(room)
local fed, stuck = 0, false
while fed < want - #first do
  if not room_feed_one(stream, room, weights, holds) then
    stuck = true
    break
  end
  fed = fed + 1
end
local second = {}
if fed > 0 then
  second = read(fed)
end
local more = redis.call('EXISTS', room)
local held = 0
if more == 1 and stuck and holds then
  more = 0
  for _, until_ms in pairs(holds) do
    if held == 0 or until_ms < held then
      held = until_ms
    end
  end
elseif more == 1 then
  room_beacon(stream, group, room)
end
return {more, first, second, held}
