-- The tenants with the most tasks waiting in the room, for an operator: at most 200 tenants
-- per priority are looked at, those next in turn first.
-- KEYS: 1 stream
-- ARGV: none
-- Returns a flat list: priority, tenant, tasks waiting, ...
local room = room_of(KEYS[1])
local out = {}
for _, p in ipairs(redis.call('ZRANGE', room, 0, -1)) do
  local ring = room .. ':' .. p
  for _, tenant in ipairs(redis.call('LRANGE', ring, 0, 199)) do
    out[#out + 1] = p
    out[#out + 1] = tenant
    out[#out + 1] = redis.call('LLEN', ring .. ':' .. tenant)
  end
end
return out
