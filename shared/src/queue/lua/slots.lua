-- Concurrency keys: at most `limit` tasks of one key run at once, across every worker.
-- A slot is held by the stream entry of the task using it (a set of entry ids per key), so
-- a slot whose entry has left the stream (finished, dead-lettered after its worker died) is
-- stale and is freed the next time someone looks. Tasks that find no slot are parked in a
-- list per key, oldest first; a freed slot passes straight to the oldest one, which goes
-- back to the stream already holding it (marked as having had its turn in the room).
-- Keys of a concurrency key are named from the queue's prefix (`llmq:{q}:`), which shares
-- the queue's hash tag, so these scripts stay on the queue's slot in Redis Cluster.

-- A key's held set outlives its last use by a week at most, so a one-off key (a batch's, a
-- chain's) whose last slot was never freed (its worker died after the outcome was written)
-- does not stay in Redis for ever.
local HELD_TTL_MS = 7 * 24 * 3600 * 1000

local function hold(held, entry)
  redis.call('SADD', held, entry)
  redis.call('PEXPIRE', held, HELD_TTL_MS)
end

-- Frees the slots of entries that are no longer in the stream.
local function free_stale(stream, held)
  for _, id in ipairs(redis.call('SMEMBERS', held)) do
    if #redis.call('XRANGE', stream, id, id) == 0 then
      redis.call('SREM', held, id)
    end
  end
end

-- Parks envelope `env` behind `key` (to be woken under `limit`), acking and deleting its
-- entry: 0, or -1 when `consumer` no longer holds the entry (nothing done).
local function park(stream, group, consumer, entry, prefix, key, limit, env)
  if #redis.call('XPENDING', stream, group, entry, entry, 1, consumer) == 0 then
    return -1
  end
  redis.call('RPUSH', prefix .. 'parked:' .. key, env)
  redis.call('HSET', prefix .. 'parked', key, limit)
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  return 0
end

-- Whether a task's result record says it ended without success. (Decoded: a model's JSON
-- answer in the record may hold any text.)
local function ended(record)
  if not record then
    return false
  end
  local ok, r = pcall(cjson.decode, record)
  local status = ok and type(r) == 'table' and r.status
  return status == 'dead' or status == 'failed' or status == 'cancelled'
end

-- Whether an idempotency key (`idem:<hash>`, whose parked copies wait under `\0idem:<hash>`)
-- is held by a run that has not ended (`idem_take.lua`).
local function key_held(prefix, key)
  if string.sub(key, 1, 6) ~= '\0idem:' then
    return false
  end
  local holder = redis.call('GET', prefix .. string.sub(key, 2))
  if not holder or string.sub(holder, 1, 5) == 'done:' then
    return false
  end
  return not ended(redis.call('GET', prefix .. 'result:' .. string.match(holder, '^[^|+]*')))
end

-- Hands free slots of `key` to its oldest parked tasks, each re-added to the stream holding
-- its slot. Limit 0 is an answer-cache flight (`answer_take.lua`) or an idempotency key's
-- copies: once nothing holds it, every parked task goes back, none holding it. Forgets the
-- key in the index once nothing is parked.
local function wake(stream, prefix, key, limit)
  local held, parked = prefix .. 'held:' .. key, prefix .. 'parked:' .. key
  if limit == 0 then
    if redis.call('SCARD', held) > 0 or key_held(prefix, key) then
      return
    end
    -- At most 2,000 a call, so one script never holds Redis long; the sweep (every second)
    -- wakes the rest.
    local woken = redis.call('LPOP', parked, 2000)
    for _, env in ipairs(woken or {}) do
      redis.call('XADD', stream, '*', 'task', env, 'room', '-')
    end
    if redis.call('LLEN', parked) == 0 then
      redis.call('HDEL', prefix .. 'parked', key)
    end
    return
  end
  while redis.call('SCARD', held) < limit do
    local env = redis.call('LPOP', parked)
    if not env then
      redis.call('HDEL', prefix .. 'parked', key)
      return
    end
    hold(held, redis.call('XADD', stream, '*', 'task', env, 'room', '-'))
  end
end
