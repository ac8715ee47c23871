-- Puts one step of a chain into a new round (see chain_retry.lua and finish.lua's rerun): a
-- new task id, its task stored, the parents it waits for (enqueued at once when none);
-- counters follow its old state.
local function rerun_step(stream, chain, steps, tasks, wait, name, task_id, env, round, waits, ok)
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
  local s = {task_id = task_id, round = tonumber(round), ok = tonumber(ok), failed = 0, cost_usd = 0}
  redis.call('DEL', wait)
  redis.call('HSET', tasks, name, env)
  if waits == '' then
    s.status = 'queued'
    redis.call('XADD', stream, '*', 'task', env)
  else
    s.status = 'blocked'
    for p in string.gmatch(waits, '[^,]+') do
      redis.call('SADD', wait, p)
    end
  end
  redis.call('HSET', steps, name, cjson.encode(s))
end
