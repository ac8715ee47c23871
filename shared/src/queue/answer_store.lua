-- Keeps answers in the answer cache, within a bound of bytes for the queue.
-- KEYS: 1 stream
-- ARGV: 1 most bytes kept, then quadruples of name (`answer:<hash>`,
-- `warm:<hash>`), TTL (ms), answer, and '1' when it counts in the bound ('' when not: it is
-- only set)
-- `answers:ends` (a sorted set of names by when their answer ends), `answers:sizes` (name to
-- bytes) and `answers:bytes` (their sum) account for what is kept. An answer that ended (Redis
-- dropped it) leaves the accounting here; to make room, the answers nearest their end go
-- first. An answer larger than the whole bound is not kept.
local stream = KEYS[1]
local prefix = string.sub(stream, 1, -7)
local ends, sizes, total = prefix .. 'answers:ends', prefix .. 'answers:sizes', prefix .. 'answers:bytes'
-- Redis' own clock, which ends the answers' TTLs, not a worker's.
local time = redis.call('TIME')
local max, now = tonumber(ARGV[1]), tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local function forget(name)
  local size = tonumber(redis.call('HGET', sizes, name) or '0')
  redis.call('HDEL', sizes, name)
  redis.call('ZREM', ends, name)
  if size > 0 and redis.call('DECRBY', total, size) < 0 then
    redis.call('SET', total, 0)
  end
end

for _, name in ipairs(redis.call('ZRANGEBYSCORE', ends, '-inf', now, 'LIMIT', 0, 100)) do
  forget(name)
end
for i = 2, #ARGV, 4 do
  local name, ttl, answer = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local size = #answer + #name
  if ARGV[i + 3] ~= '1' then
    redis.call('SET', prefix .. name, answer, 'PX', ttl)
  elseif size <= max then
    forget(name)
    while tonumber(redis.call('GET', total) or '0') + size > max do
      local first = redis.call('ZRANGE', ends, 0, 0)[1]
      if not first then
        break
      end
      forget(first)
      redis.call('DEL', prefix .. first)
    end
    redis.call('SET', prefix .. name, answer, 'PX', ttl)
    redis.call('ZADD', ends, now + ttl, name)
    redis.call('HSET', sizes, name, size)
    redis.call('INCRBY', total, size)
  end
end
return 0
