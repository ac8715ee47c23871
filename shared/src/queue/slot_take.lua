-- Takes a slot of a concurrency key for a task that a worker is about to run, or parks it.
-- KEYS: 1 stream
-- ARGV: 1 group, 2 consumer, 3 entry id, 4 key, 5 limit, 6 envelope json, or '' to only try
-- Returns 1 (the task holds a slot: run it), 0 (parked: the entry is acked and deleted,
-- the envelope waits for a slot), 2 (no slot, and no envelope was given to park: call again
-- with it) or -1 (this consumer no longer holds the entry: nothing done).
local stream, group, consumer, entry, key = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local limit = tonumber(ARGV[5])
local prefix = string.sub(stream, 1, -7)
local held = prefix .. 'held:' .. key
if redis.call('SISMEMBER', held, entry) == 1 then
  return 1
end
if redis.call('SCARD', held) >= limit then
  free_stale(stream, held)
end
if redis.call('SCARD', held) < limit then
  hold(held, entry)
  return 1
end
if ARGV[6] == '' then
  return 2
end
return park(stream, group, consumer, entry, prefix, key, limit, ARGV[6])
