-- Finishes one chain step's task and moves its chain along, in one step: settles the task
-- as finish.lua does, records the step's state, and for each child removes this step from
-- the parents it waits for; a child whose set just became empty is enqueued (the SREM that
-- returned 1 guards against a replayed finish enqueuing it twice), or cancelled when too
-- few of its parents succeeded. A failure cancels the descendants (a judge or consensus
-- join counts it and waits for its other parents), or every unfinished step with
-- `fail_chain`. When no step is left unfinished the chain is succeeded or failed.
-- KEYS: 1 stream, 2 delayed, 3 dead, 4 result key, 5 chain, 6 steps, 7 tasks
-- ARGV: 1 group, 2 consumer, 3 result ttl (s), 4 now (ms), 5 entry id, 6 kind, 7 record,
--       8 envelope, 9 a, 10 b (settle.lua), 11 step, 12 outcome (succeeded, failed or
--       cancelled), 13 step state fields as json (provider, model, cost_usd, summary, error),
--       14 the prefix of the chain's wait sets
-- Wait sets are named from ARGV[14]: they share the queue's hash tag.
-- Returns 1 applied, 0 fenced (the entry is no longer this consumer's).
local stream, group, consumer, entry = KEYS[1], ARGV[1], ARGV[2], ARGV[5]
if #redis.call('XPENDING', stream, group, entry, entry, 1, consumer) == 0 then
  return 0
end
settle(stream, KEYS[2], KEYS[3], KEYS[4], entry, ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10],
  ARGV[4], tonumber(ARGV[3]))
redis.call('XACK', stream, group, entry)
redis.call('XDEL', stream, entry)

local chain, steps, tasks, now = KEYS[5], KEYS[6], KEYS[7], ARGV[4]
local graph_json = redis.call('HGET', chain, 'graph')
if not graph_json then
  return 1
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
  if redis.call('SREM', ARGV[14] .. child, parent) == 0 then
    return
  end
  if ok then c.ok = c.ok + 1 else c.failed = c.failed + 1 end
  local g = graph[child]
  if not ok and not g.join then
    put(child, c)
    cancel(child, 'a step it runs after did not succeed: ' .. parent)
    return
  end
  if redis.call('SCARD', ARGV[14] .. child) == 0 then
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

local name, outcome = ARGV[11], ARGV[12]
local s = get(name)
if s and not final(s.status) then
  local fields = cjson.decode(ARGV[13])
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
end
return 1
