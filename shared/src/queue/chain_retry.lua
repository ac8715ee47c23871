-- Runs steps of an ended chain again: each gets a new round (and so a new task id), waits
-- for those of its parents that are not succeeded, and is enqueued when it waits for none.
-- Steps that succeeded and are not rerun keep their outputs. The chain runs again.
-- KEYS: 1 stream, 2 chain, 3 steps, 4 tasks
-- ARGV: 1 now (ms), then 7 per step: name, task id, envelope json, round, parents it waits
--       for joined by ',', parents already succeeded, and what a rejection folds (unused here)
-- Returns the number of steps rerun, or -1 when there is no such chain, -2 when it is
-- still running.
local state = redis.call('HGET', KEYS[2], 'state')
if not state then return -1 end
if state == 'running' then return -2 end
local n = (#ARGV - 1) / 7
for i = 0, n - 1 do
  local base = 2 + i * 7
  rerun_step(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[base], ARGV[base + 1], ARGV[base + 2],
    ARGV[base + 3], ARGV[base + 4], ARGV[base + 5])
end
redis.call('HSET', KEYS[2], 'state', 'running')
redis.call('HDEL', KEYS[2], 'finished_at')
-- Running again: its keys no longer expire.
for i = 2, 4 do
  redis.call('PERSIST', KEYS[i])
end
return n
