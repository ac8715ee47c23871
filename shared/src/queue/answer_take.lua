-- Looks a name up in the answer cache (`answer:<hash>`, `warm:<hash>`); on a miss, takes its
-- flight or parks behind it.
-- KEYS: 1 stream
-- ARGV: 1 group, 2 consumer, 3 entry id, 4 name, 5 '1' to take the flight (else only
-- look), 6 envelope json, or '' to only try
-- Returns the answer kept; 1 (a miss: call, holding the flight if one was asked for), 3 (a
-- miss, no flight asked for), 0 (parked: the entry is acked and deleted until the flight
-- ends), 2 (the flight is taken and no envelope was given: call again with it) or -1 (this
-- consumer no longer holds the entry: nothing done).
local stream, group, consumer, entry, name = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local prefix = string.sub(stream, 1, -7)
local answer = redis.call('GET', prefix .. name)
if answer then
  return answer
end
if ARGV[5] ~= '1' then
  return 3
end
local key = '\0' .. name
local held = prefix .. 'held:' .. key
if redis.call('SISMEMBER', held, entry) == 1 then
  return 1
end
if redis.call('SCARD', held) > 0 then
  free_stale(stream, held)
end
if redis.call('SCARD', held) == 0 then
  hold(held, entry)
  return 1
end
if ARGV[6] == '' then
  return 2
end
-- Limit 0: when the flight ends, every task parked behind it is woken, none holding it.
return park(stream, group, consumer, entry, prefix, key, 0, ARGV[6])
