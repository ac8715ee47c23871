-- The room (`QueueKeys::room` in keys.rs): ready tasks with a priority or a tenant wait here
-- and are fed to the stream in their turn: the most urgent priority first (0), and within
-- it the tenants with tasks in turn, one task each. A task fed to the stream carries the
-- field `room`, so the worker that reads it runs it instead of sorting it in again.
-- Every key is named from the queue's prefix, under its hash tag.

-- The room's key, from the stream's (`llmq:{q}:stream`).
local function room_of(stream)
  return string.sub(stream, 1, -7) .. 'room'
end

-- One feed in AGE_EVERY, while tasks wait at several priorities, goes to the priority served
-- longest ago instead of the most urgent, so a less urgent priority is never held for ever
-- behind a backlog the fleet cannot drain: each waiting priority gets at least one task in
-- AGE_EVERY times as many feeds as there are priorities waiting.
local AGE_EVERY = 10

-- The priority to feed next, of those not in `skip`; nil when there is none. Feeds are
-- counted in `room:feeds` and each priority's last one in `room:served`.
local function room_pick(room, skip)
  local ps = redis.call('ZRANGE', room, 0, -1)
  if next(skip) then
    local open = {}
    for _, q in ipairs(ps) do
      if not skip[q] then
        open[#open + 1] = q
      end
    end
    ps = open
  end
  if #ps == 0 then
    return nil
  end
  local feeds = redis.call('INCR', room .. ':feeds')
  local p = ps[1]
  if #ps > 1 and feeds % AGE_EVERY == 0 then
    local served = redis.call('HMGET', room .. ':served', unpack(ps))
    local oldest
    for i, q in ipairs(ps) do
      local at = tonumber(served[i]) or 0
      if not oldest or at < oldest then
        oldest, p = at, q
      end
    end
  end
  redis.call('HSET', room .. ':served', p, feeds)
  return p
end

-- The tenants held at their limits (`room:hold`, tenant -> until ms), read once per script:
-- those whose hold has passed are let go. Nil when none is held.
local function room_holds(room)
  local key = room .. ':hold'
  if redis.call('EXISTS', key) == 0 then
    return nil
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local flat, held, over = redis.call('HGETALL', key), {}, {}
  for i = 1, #flat, 2 do
    local until_ms = tonumber(flat[i + 1]) or 0
    if until_ms > now then
      held[flat[i]] = until_ms
    else
      over[#over + 1] = flat[i]
    end
  end
  if #over > 0 then
    redis.call('HDEL', key, unpack(over))
  end
  return next(held) and held or nil
end

-- Moves the room's next task to the stream, marked; returns its entry id, or false when
-- the room has none to feed: empty, or every tenant with tasks held (`holds`, from
-- room_holds: a held tenant's turn passes to the next, and a priority whose tenants are all
-- held to the next priority). A listing without tasks (written by hand) is dropped on the
-- way. `weights` maps a tenant to the tasks it gets per turn when more than one; its tasks
-- in this turn so far are counted in `room:turn:<p>` (not under `room:<p>:`, where a tenant
-- named `turn` has its tasks).
local function room_feed_one(stream, room, weights, holds)
  local skip, passed = {}, {}
  while true do
    local p = room_pick(room, skip)
    if not p then
      return false
    end
    local ring = room .. ':' .. p
    local tenant = redis.call('LINDEX', ring, 0)
    if not tenant then
      redis.call('ZREM', room, p)
    elseif holds and holds[tenant] then
      -- Its turn goes to the next tenant; once every tenant of the priority has passed,
      -- the priority is skipped.
      passed[p] = (passed[p] or 0) + 1
      if passed[p] >= redis.call('LLEN', ring) then
        skip[p] = true
      else
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      end
    else
      local list = ring .. ':' .. tenant
      local env = redis.call('LPOP', list)
      local weight = weights[tenant]
      local turn_over = true
      if weight then
        local turn = room .. ':turn:' .. p
        turn_over = redis.call('HINCRBY', turn, tenant, 1) >= weight
        if turn_over or redis.call('EXISTS', list) == 0 then
          redis.call('HDEL', turn, tenant)
        end
      end
      if redis.call('EXISTS', list) == 0 then
        redis.call('LPOP', ring)
        if redis.call('EXISTS', ring) == 0 then
          redis.call('ZREM', room, p)
        end
      elseif turn_over then
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      end
      if env then
        redis.call('HINCRBY', room .. ':n', p, -1)
        redis.call('LPOP', room .. ':backlog')
        return redis.call('XADD', stream, '*', 'task', env, 'room', p)
      end
    end
  end
end

-- While the room has tasks, a beacon waits in the stream unread: an entry with no task and
-- the field `room`. The worker that reads it drops it and feeds itself from the room from
-- then on; an idle worker blocked on the stream wakes for it. (A task of the room's
-- itself would jump the room's order.)
local function room_beacon(stream, group, room)
  local mark = room .. ':mark'
  local id = redis.call('GET', mark)
  if id and #redis.call('XRANGE', stream, id, id) == 1 then
    -- Without the group yet (a producer came first), nothing has been delivered.
    local held = redis.pcall('XPENDING', stream, group, id, id, 1)
    if held.err or #held == 0 then
      return
    end
  end
  redis.call('SET', mark, redis.call('XADD', stream, '*', 'room', 'wake'))
end

-- Puts envelope `env` in the room at priority `p` for `tenant`: behind the tenant's tasks,
-- or before them (`front`) for a task coming back from a wait, which keeps its place; with
-- `turn`, the tenant's turn is given back too (a task the room fed that could not be called
-- yet): it goes to the ring's head if it left the ring, or back from its tail if the feed
-- that read the task moved it there and no other feed came since. The caller then makes
-- sure of the beacon (room_beacon).
local function room_push(stream, p, tenant, env, front, turn)
  local room = room_of(stream)
  local ring = room .. ':' .. p
  local list = ring .. ':' .. tenant
  local n = redis.call(front and 'LPUSH' or 'RPUSH', list, env)
  if n == 1 then
    if redis.call(turn and 'LPUSH' or 'RPUSH', ring, tenant) == 1 then
      redis.call('ZADD', room, p, p)
    end
  elseif turn and redis.call('LINDEX', ring, -1) == tenant then
    redis.call('LMOVE', ring, ring, 'RIGHT', 'LEFT')
  end
  redis.call('HINCRBY', room .. ':n', p, 1)
  -- One byte a task, so that KEDA's redis (list length) scaler sees the room's backlog.
  redis.call('RPUSH', room .. ':backlog', p)
end
