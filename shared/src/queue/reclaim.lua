-- Takes over entries idle longer than the visibility timeout (their worker died or hung).
-- KEYS: 1 stream
-- ARGV: 1 group, 2 consumer, 3 min idle (ms), 4 count
-- Returns a flat array of id, delivery count (this one included), task payload (or false),
-- chain payload (or false).
-- A poison task (delivered too often) is claimed like any other: the caller finishes it as
-- a dead letter with `finish.lua`, so it is never in two places, whenever a worker dies.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], '0-0', 'COUNT', ARGV[4])
local out = {}
for _, entry in ipairs(claimed[2]) do
  local id, fields = entry[1], entry[2]
  local task, chain = false, false
  if fields then
    for j = 1, #fields, 2 do
      if fields[j] == 'task' then task = fields[j + 1] end
      if fields[j] == 'chain' then chain = fields[j + 1] end
    end
  end
  local info = redis.call('XPENDING', stream, group, id, id, 1)
  out[#out + 1] = id
  out[#out + 1] = info[1] and tonumber(info[1][4]) or 1
  out[#out + 1] = task
  out[#out + 1] = chain
end
return out
