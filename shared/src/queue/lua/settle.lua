-- Applies one outcome to a task whose entry this consumer holds (the caller checked):
--   ok:      store the record
--   retry:   a = due (ms): envelope to delayed; store the record
--   dead:    a = error, b = class: envelope to the dead letters; store the record
--   release: envelope back to the stream, no record
-- The caller acks and deletes the entry. The dead letter's fields are written here only.
local function settle(stream, delayed, dead, rkey, id, kind, record, env, a, b, now, ttl)
  if kind == 'retry' then
    redis.call('ZADD', delayed, a, env)
  elseif kind == 'dead' then
    local attempts = record ~= '' and cjson.decode(record)['attempts'] or 0
    redis.call('XADD', dead, '*', 'task', env, 'error', a, 'class', b,
      'attempts', tostring(attempts), 'failed_at', now, 'entry_id', id)
  elseif kind == 'release' then
    redis.call('XADD', stream, '*', 'task', env)
  end
  if record ~= '' then
    redis.call('SET', rkey, record, 'EX', ttl)
  end
end

-- For a script that finishes one entry: checks that this consumer still holds it (fencing),
-- settles it, acks and deletes it. Returns false, having done nothing, when it is not held.
local function settle_one(stream, delayed, dead, rkey, group, consumer, entry, kind, record,
    env, a, b, now, ttl)
  if #redis.call('XPENDING', stream, group, entry, entry, 1, consumer) == 0 then
    return false
  end
  settle(stream, delayed, dead, rkey, entry, kind, record, env, a, b, now, ttl)
  redis.call('XACK', stream, group, entry)
  redis.call('XDEL', stream, entry)
  return true
end
