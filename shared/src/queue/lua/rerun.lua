-- Puts one step of a chain into a new round (see chain_retry.lua and finish.lua's rerun): a
-- new task id, its task stored, the parents it waits for (`waits`, joined by ','; enqueued at
-- once when none); counters follow its old state, and its node of the graph stays.
local function rerun_step(stream, chain, steps, tasks, name, task_id, env, round, waits, ok)
  local raw = redis.call('HGET', steps, name)
  local old = raw and cjson.decode(raw) or {}
  if old.status == 'failed' then
    redis.call('HINCRBY', chain, 'failed', -1)
  elseif old.status == 'cancelled' then
    redis.call('HINCRBY', chain, 'cancelled', -1)
  end
  if old.status == 'succeeded' or old.status == 'failed' or old.status == 'cancelled' then
    redis.call('HINCRBY', chain, 'pending', 1)
  end
  local s = {task_id = task_id, round = tonumber(round), ok = tonumber(ok), failed = 0,
    cost_usd = 0, children = old.children, join = old.join, min_success = old.min_success,
    waits = {}}
  redis.call('HSET', tasks, name, env)
  for p in string.gmatch(waits, '[^,]+') do
    s.waits[#s.waits + 1] = p
  end
  if #s.waits == 0 then
    s.status = 'queued'
    redis.call('XADD', stream, '*', 'task', env)
  else
    s.status = 'blocked'
  end
  redis.call('HSET', steps, name, cjson.encode(s))
end
