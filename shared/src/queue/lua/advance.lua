-- Moves a chain along when step `name` ends with `outcome` (succeeded, failed or
-- cancelled): records the step, and for each child takes this step off the parents it
-- waits for; a child that waited for it last is enqueued (taking a parent off only once
-- guards against a replay enqueuing it twice), or cancelled when too few of its parents
-- succeeded. A failure cancels the descendants (a judge or consensus join counts it and
-- waits for its other parents), or every unfinished step with `fail_chain`. When no step is
-- left unfinished the chain is succeeded or failed, and its keys expire after `ttl` seconds,
-- like its steps' results. A step already ended is left as it is.
--
-- Each step's state carries its node of the graph (`children`, `join`, `min_success`) and
-- the parents it still waits for (`waits`), so a step reads only its own state and its
-- children's. A chain expanded by an earlier version has a `graph` field and one wait set
-- per step instead (named from `wait_prefix`, in the queue's hash tag); both are read when
-- a state lacks its own.
local function advance(stream, chain, steps, tasks, name, outcome, fields_json, wait_prefix, now,
    ttl)
  local graph
  local function old_graph()
    if graph == nil then
      local raw = redis.call('HGET', chain, 'graph')
      graph = raw and cjson.decode(raw) or {}
    end
    return graph
  end
  local function node(n, s)
    if s.children then
      return s
    end
    return old_graph()[n] or {children = {}, join = false, min_success = 1}
  end
  local function get(n)
    local s = redis.call('HGET', steps, n)
    return s and cjson.decode(s) or nil
  end
  local function put(n, s)
    redis.call('HSET', steps, n, cjson.encode(s))
  end
  local function final(status)
    return status == 'succeeded' or status == 'failed' or status == 'cancelled'
  end
  -- Takes `parent` off what `child` waits for; false when it was not waited for.
  local function unwait(child, c, parent)
    if c.waits then
      for i, p in ipairs(c.waits) do
        if p == parent then
          table.remove(c.waits, i)
          return true
        end
      end
      return false
    end
    return redis.call('SREM', wait_prefix .. child, parent) == 1
  end
  local function waiting(child, c)
    if c.waits then
      return #c.waits
    end
    return redis.call('SCARD', wait_prefix .. child)
  end
  -- Steps left unfinished, after the last one this call ended.
  local left
  local cancel
  local function parent_done(child, parent, ok)
    local c = get(child)
    if not c or final(c.status) or not unwait(child, c, parent) then
      return
    end
    if ok then c.ok = c.ok + 1 else c.failed = c.failed + 1 end
    local g = node(child, c)
    if not ok and not g.join then
      cancel(child, 'a step it runs after did not succeed: ' .. parent, c)
      return
    end
    if waiting(child, c) == 0 then
      if c.ok >= g.min_success then
        c.status = 'queued'
        put(child, c)
        redis.call('XADD', stream, '*', 'task', redis.call('HGET', tasks, child))
      else
        cancel(child, c.ok .. ' of its parents succeeded; it needs ' .. g.min_success, c)
      end
      return
    end
    put(child, c)
  end
  cancel = function(n, why, s)
    s = s or get(n)
    if not s or final(s.status) then
      return
    end
    s.status = 'cancelled'
    s.error = why
    put(n, s)
    left = redis.call('HINCRBY', chain, 'pending', -1)
    redis.call('HINCRBY', chain, 'cancelled', 1)
    for _, child in ipairs(node(n, s).children) do
      parent_done(child, n, false)
    end
  end

  local s = get(name)
  local fields = cjson.decode(fields_json)
  -- A task of an earlier round, or not the chain's at all, does not end the step; nor does
  -- any task end a step that is not queued (blocked, or waiting for a person).
  if s and fields.task_id and (fields.task_id ~= s.task_id or s.status ~= 'queued') then
    s = nil
  end
  if not s or final(s.status) then
    return
  end
  for k, v in pairs(fields) do s[k] = v end
  s.status = outcome
  put(name, s)
  left = redis.call('HINCRBY', chain, 'pending', -1)
  local children = node(name, s).children
  if outcome == 'succeeded' then
    for _, child in ipairs(children) do
      parent_done(child, name, true)
    end
  else
    redis.call('HINCRBY', chain, outcome, 1)
    local on_failure = redis.call('HGET', chain, 'on_failure') or old_graph()['.on_failure']
    if on_failure == 'fail_chain' and outcome == 'failed' then
      for _, other in ipairs(redis.call('HKEYS', steps)) do
        cancel(other, 'the chain failed at step ' .. name)
      end
    else
      for _, child in ipairs(children) do
        parent_done(child, name, false)
      end
    end
  end
  if left <= 0 and redis.call('HGET', chain, 'state') == 'running' then
    local counts = redis.call('HMGET', chain, 'failed', 'cancelled')
    local failed = tonumber(counts[1]) > 0 or tonumber(counts[2]) > 0
    redis.call('HSET', chain, 'state', failed and 'failed' or 'succeeded', 'finished_at', now)
    for _, key in ipairs({chain, steps, tasks}) do
      redis.call('EXPIRE', key, ttl)
    end
    -- An earlier version's wait sets of steps that never ran would outlive the chain.
    if redis.call('HEXISTS', chain, 'graph') == 1 then
      for _, other in ipairs(redis.call('HKEYS', steps)) do
        redis.call('EXPIRE', wait_prefix .. other, ttl)
      end
    end
  end
end
