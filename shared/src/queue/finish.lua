-- Writes a batch of outcomes of one queue in one call, whatever they are: for each item,
-- checks that this consumer still holds its entry (fencing: a worker whose claim was taken
-- over must not write), applies it, then acks and deletes every entry that was still held.
-- Every op of a chain step acts on the chain only for the step's current task (its round's)
-- while the step is queued: a stale or forged task settles its own entry and nothing else.
-- KEYS: 1 stream, 2 delayed, 3 dead, 4 the queue's intact consumers, then per item the
--   keys of its op
-- ARGV: 1 group, 2 consumer, 3 result ttl (s), 4 now (ms), 5 and 6 the lowest and highest
--   entry id of the batch, 7 the consumer's run token among the intact consumers ('' for
--   none), then per item: op, its number of keys, its number of args, args;
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
--           on_failure, then 5 per step (see expand in finish_ops.lua)
--   park:   the task's batch hash, its group's waiting set, the groups set, the batcher
--           key; entry id, task id, group (provider/model), envelope, request body,
--           deadline (ms), generation, how long a latch lives past the deadline (ms)
-- Returns one integer per item: 1 applied, 0 fenced (the entry is no longer this consumer's).

local stream, delayed, dead = KEYS[1], KEYS[2], KEYS[3]
-- Numbers stay the text they came as: Redis would print a Lua number back to text for every
-- command that takes it.
local group, consumer, ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- An item at ARGV[a]: its op, its number of keys and of args, and where its args start.
-- `done` has no counts: one key, its entry id and its record.
local function item(a)
  local op = ARGV[a]
  if op == 'done' then
    return op, 1, 2, a + 1
  end
  return op, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), a + 3
end
local last = #ARGV
-- Which of the batch's entries this consumer still holds (marked false once applied, so an
-- entry twice in the batch is applied once). An entry leaves a consumer's pending list only
-- when a takeover claims it (reclaim.lua) or when the consumer acks it, and every script
-- that acks a task's entry deletes it too. A takeover removes the holder from the intact
-- consumers, so while this consumer's process is there under its run token, each entry it
-- was given is still its own or already acked and deleted: the batch's entries are acked
-- first, and only when fewer were pending than there are is each looked up in the stream.
-- Otherwise one XPENDING over the batch's range says what the consumer still holds.
local mine, acked = {}, false
if ARGV[7] ~= '' and redis.call('HGET', KEYS[4], consumer) == ARGV[7] then
  local ids, a = {}, 8
  while a <= last do
    local _, _, na, b = item(a)
    if mine[ARGV[b]] == nil then
      mine[ARGV[b]] = true
      ids[#ids + 1] = ARGV[b]
    end
    a = b + na
  end
  if #ids > 0 and redis.call('XACK', stream, group, unpack(ids)) < #ids then
    for _, id in ipairs(ids) do
      mine[id] = #redis.call('XRANGE', stream, id, id) == 1
    end
  end
  acked = true
else
  for _, p in ipairs(redis.call('XPENDING', stream, group, ARGV[5], ARGV[6], '1000000', consumer)) do
    mine[p[1]] = true
  end
end
-- The other ops' functions, made at the first item that needs them: a batch of plain
-- successes makes none (31 closures, about 2-4 µs a call).
local h
local done, out = {}, {}
local k, a = 5, 8
while a <= last do
  local op, nk, na, b = item(a)
  local entry = ARGV[b]
  if mine[entry] then
    mine[entry] = false
    if op == 'done' then
      redis.call('SET', KEYS[k], ARGV[b + 1], 'EX', ttl)
    else
      h = h or ops()
      if op == 'expand' then
        h.expand(stream, k, b, na, now)
      elseif op == 'park' then
        h.park(stream, k, b, now)
      else
        h.settle(stream, group, delayed, dead, KEYS[k], entry, ARGV[b + 1], ARGV[b + 2],
          ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], now, ttl)
        if op == 'task' then
          if na >= 9 then
            h.end_key(stream, ARGV[b + 6], ARGV[b + 7], ARGV[b + 8])
          end
          if na == 7 or na == 10 then
            h.batch_finished(stream, ARGV[b + na - 1])
          end
        elseif op == 'step' then
          h.advance(stream, KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], ARGV[b + 6], ARGV[b + 7],
            ARGV[b + 8], ARGV[b + 9], now, ttl, ARGV[b + 10], ARGV[b + 11], ARGV[b + 12],
            na > 13 and b + 13 or nil)
        elseif op == 'await' then
          h.await_step(k, b)
        elseif op == 'rerun' then
          h.rerun_steps(stream, k, b, na)
        end
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
  if not acked then
    redis.call('XACK', stream, group, unpack(done))
  end
  redis.call('XDEL', stream, unpack(done))
end
return out
