-- Writes a batch of outcomes of one queue in one call, whatever they are: for each item,
-- checks that this consumer still holds its entry (fencing: a worker whose claim was taken
-- over must not write), applies it, then acks and deletes every entry that was still held.
-- Every op of a chain step acts on the chain only for the step's current task (its round's)
-- while the step is queued: a stale or forged task settles its own entry and nothing else.
-- KEYS: 1 stream, 2 delayed, 3 dead, then per item the keys of its op
-- ARGV: 1 group, 2 consumer, 3 result ttl (s), 4 now (ms), 5 and 6 the lowest and highest
--   entry id of the batch, then per item: op, its number of keys, its number of args, args;
--   or, for the common item, a task that succeeded with nothing more to do: `done`, its
--   entry id and its record (its one key the record's), without the counts
-- Ops, with their keys and args (settle = entry id, kind, record, envelope, a, b, as
-- settle.lua reads them):
--   task:   result key; settle, and for a task with an idempotency key that ended: its
--           name, the run holding it (`<task id>|<run>`), and its window (ms; '' when the
--           task did not succeed); then for a batch's task that ended, the name of its
--           batch's count of finished tasks
--   step:   result key, chain, steps, tasks; settle, step, outcome (succeeded, failed or
--           cancelled), step state fields as json, prefix of the chain's wait sets, then
--           the step's state as the worker read it, its new state and its children (see
--           advance.lua; three empty strings when the worker built no new state), then,
--           when the worker moved the children too, three per child: its state as read,
--           its new state, and '1' when it is then enqueued
--   await:  result key, steps, approvals; settle, task id, chain id, step, deadline (ms)
--   rerun:  result key, chain, steps, tasks; settle, task id, step, then 7 per rerun:
--           name, task id, envelope, round, waits, ok (see rerun.lua), fold
--   expand: chain, steps, tasks, the chains index; entry id, chain id, spec json,
--           on_failure, then 5 per step (see expand below)
--   park:   the task's batch hash, its group's waiting set, the groups set, the batcher
--           key; entry id, task id, group (provider/model), envelope, request body,
--           deadline (ms), generation, how long a latch lives past the deadline (ms)
-- Returns one integer per item: 1 applied, 0 fenced (the entry is no longer this consumer's).

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

local stream, delayed, dead = KEYS[1], KEYS[2], KEYS[3]
-- Numbers stay the text they came as: Redis would print a Lua number back to text for every
-- command that takes it.
local group, consumer, ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- One XPENDING for the whole batch: what this consumer still holds in the batch's range.
local mine = {}
for _, p in ipairs(redis.call('XPENDING', stream, group, ARGV[5], ARGV[6], '1000000', consumer)) do
  mine[p[1]] = true
end
local done, out = {}, {}
local k, a, last = 4, 7, #ARGV
while a <= last do
  -- `done` has no counts: one key, its entry id and its record.
  local op, nk, na, b = ARGV[a], 1, 2, a + 1
  if op ~= 'done' then
    nk, na, b = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), a + 3
  end
  local entry = ARGV[b]
  if mine[entry] then
    mine[entry] = nil
    if op == 'done' then
      redis.call('SET', KEYS[k], ARGV[b + 1], 'EX', ttl)
    elseif op == 'expand' then
      expand(stream, k, b, na, now)
    elseif op == 'park' then
      park(stream, k, b, now)
    else
      settle(stream, group, delayed, dead, KEYS[k], entry, ARGV[b + 1], ARGV[b + 2], ARGV[b + 3],
        ARGV[b + 4], ARGV[b + 5], now, ttl)
      if op == 'task' then
        if na >= 9 then
          end_key(stream, ARGV[b + 6], ARGV[b + 7], ARGV[b + 8])
        end
        if na == 7 or na == 10 then
          batch_finished(stream, ARGV[b + na - 1])
        end
      elseif op == 'step' then
        advance(stream, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[b + 6], ARGV[b + 7],
          ARGV[b + 8], ARGV[b + 9], now, ttl, ARGV[b + 10], ARGV[b + 11], ARGV[b + 12],
          na > 13 and b + 13 or nil)
      elseif op == 'await' then
        await_step(k, b)
      elseif op == 'rerun' then
        rerun_steps(stream, k, b, na)
      end
    end
    done[#done + 1] = entry
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
  k, a = k + nk, b + na
end
if #done > 0 then
  redis.call('XACK', stream, group, unpack(done))
  redis.call('XDEL', stream, unpack(done))
end
return out
