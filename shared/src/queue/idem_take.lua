-- An idempotency key, as a task carrying it is about to run, when it is not simply free
-- (`queue/idem.rs` tries a plain SET NX first).
-- KEYS: 1 stream
-- ARGV: 1 group, 2 consumer, 3 entry id, 4 name (`idem:<hash>`), 5 this run's holder value
-- (`<task id>|<run>`), 6 how long to hold it (ms), 7 envelope json, or '' to only try
-- The key holds the run that holds it, `<task id>|<the stream entry that first took it>`
-- (followed by `+` once a copy parked behind it, so that its end wakes them), or
-- `done:<task id>` once that run succeeded.
-- Returns 1 (run: the task holds the key), the first task's result record (a copy of a task
-- that succeeded: answer it with that), 0 (parked until the task holding the key ends), 2
-- (held, and no envelope was given to park: call again with it) or -1 (this consumer no
-- longer holds the entry: nothing done).
local stream, group, consumer, entry = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local name, mine = ARGV[4], ARGV[5]
local task = string.match(mine, '^[^|]*')
local prefix = string.sub(stream, 1, -7)
local key = prefix .. name
local holder = redis.call('GET', key)
if holder == mine or holder == mine .. '+' then
  return 1
end
if holder then
  local done = string.sub(holder, 1, 5) == 'done:'
  local first = done and string.sub(holder, 6) or string.match(holder, '^[^|+]*')
  local record = redis.call('GET', prefix .. 'result:' .. first)
  if done and record then
    redis.call('INCR', prefix .. 'duplicates')
    return record
  end
  -- Held by a run that has not ended (another task's, or another entry of this same task
  -- id sent again): wait for it. (One that ended failed or dead freed the key as it ended;
  -- a record saying so is only looked at in case it could not.)
  if not done and not ended(record) then
    if ARGV[7] == '' then
      return 2
    end
    local parked = park(stream, group, consumer, entry, prefix, '\0' .. name, 0, ARGV[7])
    if parked == 0 and string.sub(holder, -1) ~= '+' then
      redis.call('SET', key, holder .. '+', 'KEEPTTL')
    end
    return parked
  end
  -- Succeeded, but its record is gone (kept for less than the window): run again.
end
redis.call('SET', key, mine, 'PX', ARGV[6])
return 1
