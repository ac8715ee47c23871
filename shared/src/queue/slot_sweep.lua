-- For every concurrency key with parked tasks: frees stale slots (their task left the
-- stream without freeing them, e.g. its worker died after finishing it) and wakes parked
-- tasks into what is free. Run every second or so by workers and the scheduler.
-- KEYS: 1 stream
-- Returns how many keys have parked tasks.
local stream = KEYS[1]
local prefix = string.sub(stream, 1, -7)
local index = redis.call('HGETALL', prefix .. 'parked')
for i = 1, #index, 2 do
  local key, limit = index[i], tonumber(index[i + 1])
  free_stale(stream, prefix .. 'held:' .. key)
  wake(stream, prefix, key, limit)
end
return #index / 2
