-- For every concurrency key with parked tasks: frees stale slots (their task left the
-- stream without freeing them, e.g. its worker died after finishing it) and wakes parked
-- tasks into what is free. Every worker and the scheduler call it about once a second; only
-- the first call in each second does the work, however many there are.
-- KEYS: 1 stream
-- Returns how many keys have parked tasks, or -1 when this second's sweep was done already.
local stream = KEYS[1]
local prefix = string.sub(stream, 1, -7)
if not redis.call('SET', prefix .. 'swept', '1', 'NX', 'PX', 900) then
  return -1
end
local index = redis.call('HGETALL', prefix .. 'parked')
for i = 1, #index, 2 do
  local key, limit = index[i], tonumber(index[i + 1])
  free_stale(stream, prefix .. 'held:' .. key)
  wake(stream, prefix, key, limit)
end
return #index / 2
