-- Expands a validated chain from the stream entry that carried it, once per chain id: stores
-- its spec and graph, each step's state and task, the parents each step waits for, enqueues
-- the steps that wait for nobody, then acks and deletes the entry. A replayed expansion (same
-- chain id) only acks and deletes.
-- KEYS: 1 stream, 2 chain, 3 steps, 4 tasks, 5 the queue's chains index, then one wait set
--       per step that has parents, in the order of the steps
-- ARGV: 1 group, 2 consumer, 3 entry id, 4 chain id, 5 spec json, 6 graph json, 7 now (ms),
--       then 5 per step: name, task id, envelope json, parents joined by ',', definition
--       json (stored as the chain's field `def:<name>`, so a step reads only its own)
-- Returns 1 expanded, 0 expanded before, -1 the entry is no longer this consumer's.
local stream, group, consumer, entry = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if #redis.call('XPENDING', stream, group, entry, entry, 1, consumer) == 0 then
  return -1
end
local created = 0
if redis.call('EXISTS', KEYS[2]) == 0 then
  local n = (#ARGV - 7) / 5
  redis.call('HSET', KEYS[2], 'spec', ARGV[5], 'graph', ARGV[6], 'state', 'running',
    'created_at', ARGV[7], 'pending', n, 'failed', 0, 'cancelled', 0, 'queue_entry', entry)
  redis.call('ZADD', KEYS[5], ARGV[7], ARGV[4])
  local wait = 6
  for i = 0, n - 1 do
    local base = 8 + i * 5
    local name, task_id, env, parents = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
    redis.call('HSET', KEYS[4], name, env)
    redis.call('HSET', KEYS[2], 'def:' .. name, ARGV[base + 4])
    local state = {task_id = task_id, round = 0, ok = 0, failed = 0}
    if parents == '' then
      state.status = 'queued'
      redis.call('XADD', stream, '*', 'task', env)
    else
      state.status = 'blocked'
      for p in string.gmatch(parents, '[^,]+') do
        redis.call('SADD', KEYS[wait], p)
      end
      wait = wait + 1
    end
    redis.call('HSET', KEYS[3], name, cjson.encode(state))
  end
  created = 1
end
redis.call('XACK', stream, group, entry)
redis.call('XDEL', stream, entry)
return created
