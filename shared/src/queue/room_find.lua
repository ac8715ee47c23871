-- Whether task `id` waits in the room, looking at no more than `limit` envelopes (the id is
-- matched as plain text, never as a pattern).
-- KEYS: 1 stream
-- ARGV: 1 task id, 2 limit
-- Returns the task's envelope when found, else 0.
local room = room_of(KEYS[1])
local id, left = ARGV[1], tonumber(ARGV[2])
for _, p in ipairs(redis.call('ZRANGE', room, 0, -1)) do
  local ring = room .. ':' .. p
  for _, tenant in ipairs(redis.call('LRANGE', ring, 0, -1)) do
    local list = ring .. ':' .. tenant
    local from = 0
    while left > 0 do
      local page = redis.call('LRANGE', list, from, from + math.min(left, 500) - 1)
      if #page == 0 then
        break
      end
      for _, env in ipairs(page) do
        if string.find(env, id, 1, true) then
          return env
        end
      end
      left = left - #page
      from = from + #page
    end
    if left <= 0 then
      return 0
    end
  end
end
return 0
