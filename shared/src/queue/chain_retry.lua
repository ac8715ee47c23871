-- Runs steps of an ended chain again: each gets a new round (and so a new task id), waits
-- for those of its parents that are not succeeded, and is enqueued when it waits for none.
-- Steps that succeeded and are not rerun keep their outputs. The chain runs again.
-- KEYS: 1 stream, 2 chain, 3 steps, 4 tasks, then one wait set per step, in order
-- ARGV: 1 now (ms), then 6 per step: name, task id, envelope json, round, parents it waits
--       for joined by ',', parents already succeeded
-- Returns the number of steps rerun, or -1 when there is no such chain, -2 when it is
-- still running.
local state = redis.call('HGET', KEYS[2], 'state')
if not state then return -1 end
if state == 'running' then return -2 end
local n = (#ARGV - 1) / 6
for i = 0, n - 1 do
  local base = 2 + i * 6
  local name, task_id, env, round = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local waits, ok = ARGV[base + 4], tonumber(ARGV[base + 5])
  local raw = redis.call('HGET', KEYS[3], name)
  local old = raw and cjson.decode(raw) or {}
  if old.status == 'failed' then
    redis.call('HINCRBY', KEYS[2], 'failed', -1)
  elseif old.status == 'cancelled' then
    redis.call('HINCRBY', KEYS[2], 'cancelled', -1)
  end
  if old.status == 'succeeded' or old.status == 'failed' or old.status == 'cancelled' then
    redis.call('HINCRBY', KEYS[2], 'pending', 1)
  end
  local s = {task_id = task_id, round = tonumber(round), ok = ok, failed = 0, cost_usd = 0}
  local wait = KEYS[5 + i]
  redis.call('DEL', wait)
  redis.call('HSET', KEYS[4], name, env)
  if waits == '' then
    s.status = 'queued'
    redis.call('XADD', KEYS[1], '*', 'task', env)
  else
    s.status = 'blocked'
    for p in string.gmatch(waits, '[^,]+') do
      redis.call('SADD', wait, p)
    end
  end
  redis.call('HSET', KEYS[3], name, cjson.encode(s))
end
redis.call('HSET', KEYS[2], 'state', 'running')
redis.call('HDEL', KEYS[2], 'finished_at')
return n
