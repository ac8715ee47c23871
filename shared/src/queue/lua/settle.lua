-- Applies one outcome to a task whose entry this consumer holds (the caller checked it):
--   ok:      store the record
--   retry:   a = due (ms): envelope to delayed; store the record
--   dead:    a = error, b = class: envelope to the dead letters; store the record
--   release: envelope back to the stream, no record; marked as having had its turn (it
--            was run, so it came from the room or has no class), so it is run again
--   room, room_front, room_turn: a = priority, b = tenant: envelope into the room
--            (lua/room.lua), behind the tenant's tasks, before them, or before them with
--            the tenant's turn given back; no record
--   room_hold: a = `<priority>:<until ms>`, b = tenant: as room_turn, and the tenant is held
--            (at its limits) until then: the room feeds its tasks no sooner
-- The caller (finish.lua) acks and deletes the entry. The dead letter's fields are written
-- here only.
local function settle(stream, group, delayed, dead, rkey, id, kind, record, env, a, b, now, ttl)
  if kind == 'retry' then
    redis.call('ZADD', delayed, a, env)
  elseif kind == 'dead' then
    local attempts = record ~= '' and cjson.decode(record)['attempts'] or 0
    redis.call('XADD', dead, '*', 'task', env, 'error', a, 'class', b,
      'attempts', tostring(attempts), 'failed_at', now, 'entry_id', id)
  elseif kind == 'release' then
    redis.call('XADD', stream, '*', 'task', env, 'room', '-')
  elseif kind == 'room' or kind == 'room_front' or kind == 'room_turn' then
    room_push(stream, a, b, env, kind ~= 'room', kind == 'room_turn')
    room_beacon(stream, group, room_of(stream))
  elseif kind == 'room_hold' then
    local p, hold = string.match(a, '^(%d+):(%d+)$')
    room_push(stream, p, b, env, true, true)
    redis.call('HSET', room_of(stream) .. ':hold', b, hold)
    room_beacon(stream, group, room_of(stream))
  end
  if record ~= '' then
    redis.call('SET', rkey, record, 'EX', ttl)
  end
end

