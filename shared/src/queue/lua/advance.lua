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
--
-- The worker may send the step's state as it read it before running the step (`seen`), the
-- state it becomes (`new`: the fields merged over it, the outcome as its status) and its
-- children (`children`, joined by ','). While the stored state is still `seen`, `new` is
-- swapped in as it is: no JSON is decoded or encoded for the step itself. Otherwise (a
-- sibling's rejection folded findings into it, the chain was cancelled meanwhile, or the
-- worker sent none) the fields are merged here. For a step that succeeded the worker may
-- also send its children's moves (`moves`: the index in ARGV of three per child, as read,
-- as moved, '1' when then enqueued); while the step's and every child's states are still
-- as read, they are all swapped in with one HSET, and the children moved here otherwise.
--
-- The helpers live at the top of the script, not in `advance`: a script that moves many
-- steps creates them once. `advance` sets the keys they work on (`adv`) for each step.
local adv = {}

local function adv_graph()
  if adv.graph == nil then
    local raw = redis.call('HGET', adv.chain, 'graph')
    adv.graph = raw and cjson.decode(raw) or {}
  end
  return adv.graph
end

local function adv_node(n, s)
  if s.children then
    return s
  end
  return adv_graph()[n] or {children = {}, join = false, min_success = 1}
end

local function adv_get(n)
  local s = redis.call('HGET', adv.steps, n)
  return s and cjson.decode(s) or nil
end

local function adv_put(n, s)
  redis.call('HSET', adv.steps, n, cjson.encode(s))
end

local function adv_final(status)
  return status == 'succeeded' or status == 'failed' or status == 'cancelled'
end

-- Takes `parent` off what `child` waits for; false when it was not waited for.
local function adv_unwait(child, c, parent)
  if c.waits then
    for i, p in ipairs(c.waits) do
      if p == parent then
        table.remove(c.waits, i)
        return true
      end
    end
    return false
  end
  return redis.call('SREM', adv.wait_prefix .. child, parent) == 1
end

local function adv_waiting(child, c)
  if c.waits then
    return #c.waits
  end
  return redis.call('SCARD', adv.wait_prefix .. child)
end

local adv_cancel

local function adv_parent_done(child, parent, ok)
  local c = adv_get(child)
  if not c or adv_final(c.status) or not adv_unwait(child, c, parent) then
    return
  end
  if ok then c.ok = c.ok + 1 else c.failed = c.failed + 1 end
  local g = adv_node(child, c)
  if not ok and not g.join then
    adv_cancel(child, 'a step it runs after did not succeed: ' .. parent, c)
    return
  end
  if adv_waiting(child, c) == 0 then
    if c.ok >= g.min_success then
      c.status = 'queued'
      adv_put(child, c)
      redis.call('XADD', adv.stream, '*', 'task', redis.call('HGET', adv.tasks, child))
    else
      adv_cancel(child, c.ok .. ' of its parents succeeded; it needs ' .. g.min_success, c)
    end
    return
  end
  adv_put(child, c)
end

adv_cancel = function(n, why, s)
  s = s or adv_get(n)
  if not s or adv_final(s.status) then
    return
  end
  s.status = 'cancelled'
  s.error = why
  adv_put(n, s)
  adv.left = redis.call('HINCRBY', adv.chain, 'pending', '-1')
  redis.call('HINCRBY', adv.chain, 'cancelled', '1')
  for _, child in ipairs(adv_node(n, s).children) do
    adv_parent_done(child, n, false)
  end
end

-- Swaps in the step's state and its children's as the worker moved them (`moves`), if
-- every one is still as the worker read it; false otherwise, having written nothing. Then
-- the step's state as it was stored.
local function adv_moved(name, seen, new, children, moves)
  local names = {name}
  for i, child in ipairs(children) do
    names[i + 1] = child
  end
  local now = redis.call('HMGET', adv.steps, unpack(names))
  if now[1] ~= seen then
    return false, now[1]
  end
  local put = {name, new}
  for i, child in ipairs(children) do
    local m = moves + 3 * (i - 1)
    if now[i + 1] ~= ARGV[m] then
      return false, now[1]
    end
    if ARGV[m + 1] ~= ARGV[m] then
      put[#put + 1] = child
      put[#put + 1] = ARGV[m + 1]
    end
  end
  redis.call('HSET', adv.steps, unpack(put))
  for i, child in ipairs(children) do
    if ARGV[moves + 3 * i - 1] == '1' then
      redis.call('XADD', adv.stream, '*', 'task', redis.call('HGET', adv.tasks, child))
    end
  end
  return true, now[1]
end

local function advance(stream, chain, steps, tasks, name, outcome, fields_json, wait_prefix, now,
    ttl, seen, new, children_csv, moves)
  adv = {stream = stream, chain = chain, steps = steps, tasks = tasks,
    wait_prefix = wait_prefix}
  local children, moved, raw
  if seen and seen ~= '' then
    children = {}
    for child in string.gmatch(children_csv, '[^,]+') do
      children[#children + 1] = child
    end
    if moves and outcome == 'succeeded' then
      moved, raw = adv_moved(name, seen, new, children, moves)
    end
  end
  if raw == nil then
    raw = redis.call('HGET', steps, name)
  end
  if moved then
    -- Done: the step, its children, and those of them it was the last parent of enqueued.
  elseif children and raw == seen then
    -- The worker found the step queued and its own; it still is.
    redis.call('HSET', steps, name, new)
  else
    local s = raw and cjson.decode(raw)
    local fields = cjson.decode(fields_json)
    -- A task of an earlier round, or not the chain's at all, does not end the step; nor
    -- does any task end a step that is not queued (blocked, or waiting for a person).
    if s and fields.task_id and (fields.task_id ~= s.task_id or s.status ~= 'queued') then
      s = nil
    end
    if not s or adv_final(s.status) then
      return
    end
    for k, v in pairs(fields) do s[k] = v end
    s.status = outcome
    adv_put(name, s)
    children = adv_node(name, s).children
  end
  adv.left = redis.call('HINCRBY', chain, 'pending', '-1')
  if moved then
  elseif outcome == 'succeeded' then
    for _, child in ipairs(children) do
      adv_parent_done(child, name, true)
    end
  else
    redis.call('HINCRBY', chain, outcome, '1')
    local on_failure = redis.call('HGET', chain, 'on_failure') or adv_graph()['.on_failure']
    if on_failure == 'fail_chain' and outcome == 'failed' then
      for _, other in ipairs(redis.call('HKEYS', steps)) do
        adv_cancel(other, 'the chain failed at step ' .. name)
      end
    else
      for _, child in ipairs(children) do
        adv_parent_done(child, name, false)
      end
    end
  end
  local head = adv.left <= 0 and redis.call('HMGET', chain, 'state', 'failed', 'cancelled')
  if head and head[1] == 'running' then
    local failed = tonumber(head[2]) > 0 or tonumber(head[3]) > 0
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
