-- Frees the slots of finished tasks and passes them on to parked tasks.
-- KEYS: 1 stream
-- ARGV: pairs of entry id, key
local stream = KEYS[1]
local prefix = string.sub(stream, 1, -7)
for i = 1, #ARGV, 2 do
  local key = ARGV[i + 1]
  redis.call('SREM', prefix .. 'held:' .. key, ARGV[i])
  local limit = redis.call('HGET', prefix .. 'parked', key)
  if limit then
    wake(stream, prefix, key, tonumber(limit))
  end
end
return 0
