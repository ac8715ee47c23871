-- The ops of finish.lua other than a plain task's success, with what they use, made only
-- when a batch has such an item (finish.rs wraps the helpers and this file in a function).
-- Each op reads its keys from KEYS[k] on and its args from ARGV[b] on (settle's six first):
-- nothing is copied per item.

-- An approval step's task: the step waits for a person until the deadline.
local function await_step(k, b)
  local steps, approvals = KEYS[k + 1], KEYS[k + 2]
  local task_id, chain_id, name, deadline = ARGV[b + 6], ARGV[b + 7], ARGV[b + 8], ARGV[b + 9]
  local raw = redis.call('HGET', steps, name)
  if not raw then
    return
  end
  local s = cjson.decode(raw)
  if s.status == 'queued' and s.task_id == task_id then
    s.status = 'awaiting_approval'
    s.deadline = tonumber(deadline)
    redis.call('HSET', steps, name, cjson.encode(s))
    redis.call('ZADD', approvals, deadline, chain_id .. '\t' .. name)
  end
end

-- A step sends work back (a review's or check's rejection) or escalates: the steps to run
-- again go into their next round, while the chain runs and the step is still this task's.
local function rerun_steps(stream, k, b, na)
  local chain, steps, tasks = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local task_id, name = ARGV[b + 6], ARGV[b + 7]
  if redis.call('HGET', chain, 'state') ~= 'running' then
    return
  end
  local raw = redis.call('HGET', steps, name)
  local s = raw and cjson.decode(raw)
  if not s then
    return
  end
  -- A step whose task is no longer its current one (a sibling's rejection sent the work,
  -- and this step with it, into a new round) reruns nothing: it may only fold.
  local current = s.task_id == task_id and s.status == 'queued'
  -- Two reviews that reject the same work at once send it back once: a step a sibling's
  -- rejection already put into this round is not run again. Its findings are folded into
  -- that round while it has not run; a step that already succeeded in it counts as a parent
  -- that succeeded for the steps after it. (A step that failed or was cancelled in it runs
  -- again, as a rerun always did.)
  local settled = {}
  for r = b + 8, b + na - 1, 7 do
    local step, round = ARGV[r], tonumber(ARGV[r + 3])
    local raw_now = redis.call('HGET', steps, step)
    local now_s = raw_now and cjson.decode(raw_now)
    if now_s and (tonumber(now_s.round) or 0) >= round and now_s.status ~= 'failed'
        and now_s.status ~= 'cancelled' then
      if now_s.status == 'succeeded' then
        settled[step] = true
      elseif ARGV[r + 6] ~= '' then
        local folded = now_s.folded
        if type(folded) ~= 'table' then folded = {} end
        folded[#folded + 1] = ARGV[r + 6]
        now_s.folded = folded
        redis.call('HSET', steps, step, cjson.encode(now_s))
      end
    elseif current then
      local waits, ok = {}, tonumber(ARGV[r + 5])
      for p in string.gmatch(ARGV[r + 4], '[^,]+') do
        if settled[p] then ok = ok + 1 else waits[#waits + 1] = p end
      end
      rerun_step(stream, chain, steps, tasks, step, ARGV[r + 1], ARGV[r + 2], ARGV[r + 3],
        table.concat(waits, ','), ok)
    end
  end
end

-- Expands a validated chain, once per chain id: its spec, each step's definition (the
-- chain's field `def:<name>`, so a step reads only its own), task and state (its node of the
-- graph and the parents it waits for included), one write per hash; the steps that wait for
-- nobody are enqueued. A replayed expansion (same chain id) writes nothing. Per step: name,
-- envelope, definition json, state json, `1` when it waits for nobody.
local function expand(stream, k, b, na, now)
  local chain, steps, tasks, index = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  if redis.call('EXISTS', chain) == 1 then
    return
  end
  local n = (na - 4) / 5
  local head = {'spec', ARGV[b + 2], 'on_failure', ARGV[b + 3], 'state', 'running',
    'created_at', now, 'pending', n, 'failed', 0, 'cancelled', 0, 'queue_entry', ARGV[b]}
  local envs, states = {}, {}
  for i = b + 4, b + na - 1, 5 do
    local name = ARGV[i]
    head[#head + 1] = 'def:' .. name
    head[#head + 1] = ARGV[i + 2]
    envs[#envs + 1] = name
    envs[#envs + 1] = ARGV[i + 1]
    states[#states + 1] = name
    states[#states + 1] = ARGV[i + 3]
    if ARGV[i + 4] == '1' then
      redis.call('XADD', stream, '*', 'task', ARGV[i + 1])
    end
  end
  redis.call('HSET', chain, unpack(head))
  redis.call('HSET', tasks, unpack(envs))
  redis.call('HSET', steps, unpack(states))
  redis.call('ZADD', index, now, ARGV[b + 1])
end

-- A keyed task ended: its key remembers it for the window (its copies are answered with its
-- answer) or, when it did not succeed, is free (its next copy runs). The key holds the run
-- holding it (`<task id>|<run>`), with `+` after it once a copy parked behind it
-- (idem_take.lua): then the copies wake. Only the run holding the key ends it; the common
-- case, a success with no copy, is one SET.
local function end_key(stream, name, mine, window)
  local prefix = string.sub(stream, 1, -7)
  local key = prefix .. name
  local old
  if window ~= '' then
    old = redis.call('SET', key, 'done:' .. string.match(mine, '^[^|]*'), 'PX', window, 'GET')
  else
    old = redis.call('GET', key)
    if old == mine or old == mine .. '+' then
      redis.call('DEL', key)
    end
  end
  if old == mine .. '+' then
    wake(stream, prefix, '\0' .. name, 0)
  elseif old and old ~= mine and window ~= '' then
    -- Another run's (a replay took the key over): put it back.
    local ttl = string.sub(old, 1, 5) == 'done:' and window or HELD_TTL_MS
    redis.call('SET', key, old, 'PX', ttl)
  end
end

-- A task that can wait goes to wait for a provider batch (queue/batch.rs): kept in its batch
-- hash with what the batch needs, in its group's waiting set, its group among the groups. A
-- task that has a batch hash went to a batch before, and the hash is its latch: this entry is
-- a copy, only acked. With no scheduler sending the queue's batches (no batcher key), the
-- latch says `fallback` and the task goes back to the stream, where it is called as usual.
local function park(stream, k, b, now)
  local key = KEYS[k]
  if redis.call('EXISTS', key) == 1 then
    return
  end
  local group, env, deadline = ARGV[b + 2], ARGV[b + 3], ARGV[b + 5]
  if redis.call('EXISTS', KEYS[k + 3]) == 0 then
    batch_back(stream, key, 'fallback', 'reason', 'no scheduler sends this queue\'s batches', env,
      tonumber(deadline), tonumber(now), tonumber(ARGV[b + 7]))
    return
  end
  redis.call('HSET', key, 'state', 'waiting', 'group', group, 'env', env, 'body', ARGV[b + 4],
    'deadline', deadline, 'gen', ARGV[b + 6])
  redis.call('ZADD', KEYS[k + 1], now, ARGV[b + 1])
  redis.call('SADD', KEYS[k + 2], group)
end

-- A batch's task ended: one more of the batch's tasks finished (`llmq batch --wait` reads
-- the count for its progress), kept a week after the last: the week is set again every
-- 1,000th, so the count costs one INCR a task.
local function batch_finished(stream, name)
  local key = string.sub(stream, 1, -7) .. name
  if redis.call('INCR', key) % 1000 == 1 then
    redis.call('PEXPIRE', key, 604800000)
  end
end

return {await_step = await_step, rerun_steps = rerun_steps, expand = expand,
  end_key = end_key, park = park, batch_finished = batch_finished, settle = settle,
  advance = advance}
