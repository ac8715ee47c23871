-- Takes over entries idle longer than the visibility timeout (their worker died or hung).
-- KEYS: 1 stream, 2 the queue's live workers (zset of heartbeat times), 3 the queue's intact
--   consumers (see finish.lua)
-- ARGV: 1 group, 2 consumer, 3 min idle (ms), 4 count, 5 now (ms, the workers' clock)
-- Returns a flat array of id, delivery count (this one included), task payload (or false),
-- chain payload (or false), the worker that held it, 1 when that worker was alive but did
-- not keep its claim, else 0, and 1 when the entry has had its turn in the room (its field
-- `room`), else 0. Alive: it was seen (a heartbeat, or a refresh of its other
-- claims, which also beats) more than half a timeout after this entry's claim was last
-- kept. A worker refreshes every quarter of the timeout, so one that died was last seen at
-- most about that long after its last refresh of any claim it held.
-- XPENDING IDLE reads the whole pending list for idle entries, wherever they are in it, and
-- names each one's holder; XCLAIM with the same min idle takes exactly those (entries deleted
-- meanwhile leave the pending list and are not returned).
-- A poison task (delivered too often) is claimed like any other: the caller finishes it as
-- a dead letter with `finish.lua`, so it is never in two places, whenever a worker dies.
local stream, workers = KEYS[1], KEYS[2]
local group, consumer, min_idle, count, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local idle = redis.call('XPENDING', stream, group, 'IDLE', min_idle, '-', '+', count)
if #idle == 0 then return {} end
local ids, holder, kept = {}, {}, {}
for i, p in ipairs(idle) do
  ids[i] = p[1]
  holder[p[1]] = p[2]
  kept[p[1]] = now - tonumber(p[3])
end
local claimed = redis.call('XCLAIM', stream, group, consumer, min_idle, unpack(ids))
-- Whoever held a claimed entry (this consumer too, taking back its own) is no longer intact:
-- a finish of its own for that entry, still to come, must find it gone.
local holders = {}
for _, entry in ipairs(claimed) do
  holders[#holders + 1] = holder[entry[1]]
end
if #holders > 0 then
  redis.call('HDEL', KEYS[3], unpack(holders))
end
local out = {}
for _, entry in ipairs(claimed) do
  local id, fields = entry[1], entry[2]
  local task, chain, room = false, false, 0
  if fields then
    for j = 1, #fields, 2 do
      if fields[j] == 'task' then task = fields[j + 1] end
      if fields[j] == 'chain' then chain = fields[j + 1] end
      if fields[j] == 'room' then room = 1 end
    end
  end
  local info = redis.call('XPENDING', stream, group, id, id, 1)
  local from = holder[id] or ''
  local seen = tonumber(redis.call('ZSCORE', workers, from) or '0') or 0
  local alive = from ~= consumer and seen > kept[id] + tonumber(min_idle) / 2
  out[#out + 1] = id
  out[#out + 1] = info[1] and tonumber(info[1][4]) or 1
  out[#out + 1] = task
  out[#out + 1] = chain
  out[#out + 1] = from
  out[#out + 1] = alive and 1 or 0
  out[#out + 1] = room
end
return out
