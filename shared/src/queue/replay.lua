-- Re-enqueues a dead letter, then removes it: both in one step, so nothing is lost between.
-- KEYS: 1 dead, 2 stream, 3 result key
-- ARGV: 1 dead entry id, 2 envelope json
-- Returns 1, or 0 when the dead letter no longer exists.
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', 'task', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
