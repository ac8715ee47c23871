-- Drops from a queue's chains index the chains whose keys have expired, for the lease holder
-- only: one page of the index, oldest first. A chain enters the index in the script that
-- writes its keys, so a chain in the index without its hash is one whose TTL ran out.
-- KEYS: 1 the queue's fence (see fence.lua), 2 the chains index
-- ARGV: 1 holder id, 2 fencing token, 3 what a chain's key starts with (its id follows),
--       4 the page's first rank, 5 the page's size
-- Returns {dropped, read}, or -1 when not the holder.
if not is_holder() then
  return -1
end
local first = tonumber(ARGV[4])
local ids = redis.call('ZRANGE', KEYS[2], first, first + tonumber(ARGV[5]) - 1)
local gone = {}
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[3] .. id) == 0 then
    gone[#gone + 1] = id
  end
end
if #gone > 0 then
  redis.call('ZREM', KEYS[2], unpack(gone))
end
return {#gone, #ids}
