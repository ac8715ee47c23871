-- Moves a chain along when step `name` ends with `outcome` (succeeded, failed or
-- cancelled): records the step, and for each child removes this step from the parents it
-- waits for; a child whose set just became empty is enqueued (the SREM that returned 1
-- guards against a replay enqueuing it twice), or cancelled when too few of its parents
-- succeeded. A failure cancels the descendants (a judge or consensus join counts it and
-- waits for its other parents), or every unfinished step with `fail_chain`. When no step is
-- left unfinished the chain is succeeded or failed. Wait sets are named from `wait_prefix`:
-- they share the queue's hash tag. A step already ended is left as it is. An ended chain's
-- keys, wait sets included, expire after `ttl` seconds, like its steps' results.
local function advance(stream, chain, steps, tasks, name, outcome, fields_json, wait_prefix, now,
    ttl)
  local graph_json = redis.call('HGET', chain, 'graph')
  if not graph_json then
    return
  end
  local graph = cjson.decode(graph_json)
  local function get(name)
    local s = redis.call('HGET', steps, name)
    return s and cjson.decode(s) or nil
  end
  local function put(name, s)
    redis.call('HSET', steps, name, cjson.encode(s))
  end
  local function final(status)
    return status == 'succeeded' or status == 'failed' or status == 'cancelled'
  end
  local cancel
  local function parent_done(child, parent, ok)
    local c = get(child)
    if not c or final(c.status) then
      return
    end
    if redis.call('SREM', wait_prefix .. child, parent) == 0 then
      return
    end
    if ok then c.ok = c.ok + 1 else c.failed = c.failed + 1 end
    local g = graph[child]
    if not ok and not g.join then
      put(child, c)
      cancel(child, 'a step it runs after did not succeed: ' .. parent)
      return
    end
    if redis.call('SCARD', wait_prefix .. child) == 0 then
      if c.ok >= g.min_success then
        c.status = 'queued'
        put(child, c)
        redis.call('XADD', stream, '*', 'task', redis.call('HGET', tasks, child))
      else
        put(child, c)
        cancel(child, c.ok .. ' of its parents succeeded; it needs ' .. g.min_success)
      end
      return
    end
    put(child, c)
  end
  cancel = function(name, why)
    local s = get(name)
    if not s or final(s.status) then
      return
    end
    s.status = 'cancelled'
    s.error = why
    put(name, s)
    redis.call('HINCRBY', chain, 'pending', -1)
    redis.call('HINCRBY', chain, 'cancelled', 1)
    for _, child in ipairs(graph[name].children) do
      parent_done(child, name, false)
    end
  end

  local s = get(name)
  local fields = cjson.decode(fields_json)
  -- A task of an earlier round, or not the chain's at all, does not end the step; nor does
  -- any task end a step that is not queued (blocked, or waiting for a person).
  if s and fields.task_id and (fields.task_id ~= s.task_id or s.status ~= 'queued') then
    s = nil
  end
  if s and not final(s.status) then
    for k, v in pairs(fields) do s[k] = v end
    s.status = outcome
    put(name, s)
    redis.call('HINCRBY', chain, 'pending', -1)
    if outcome == 'succeeded' then
      for _, child in ipairs(graph[name].children) do
        parent_done(child, name, true)
      end
    else
      redis.call('HINCRBY', chain, outcome, 1)
      if graph['.on_failure'] == 'fail_chain' and outcome == 'failed' then
        for other, _ in pairs(graph) do
          if other ~= '.on_failure' then
            cancel(other, 'the chain failed at step ' .. name)
          end
        end
      else
        for _, child in ipairs(graph[name].children) do
          parent_done(child, name, false)
        end
      end
    end
  end
  if tonumber(redis.call('HGET', chain, 'pending')) <= 0 and redis.call('HGET', chain, 'state') == 'running' then
    local failed = tonumber(redis.call('HGET', chain, 'failed')) > 0
      or tonumber(redis.call('HGET', chain, 'cancelled')) > 0
    redis.call('HSET', chain, 'state', failed and 'failed' or 'succeeded', 'finished_at', now)
    for _, key in ipairs({chain, steps, tasks}) do
      redis.call('EXPIRE', key, ttl)
    end
    -- Wait sets of steps that never ran (cancelled ones) would outlive the chain.
    for other, _ in pairs(graph) do
      if other ~= '.on_failure' then
        redis.call('EXPIRE', wait_prefix .. other, ttl)
      end
    end
  end
end
