-- Fenced writes to a queue, for the scheduler's lease holder only. Every fenced queue script
-- takes KEYS[1] the queue's copy of the fence (`llmq:{q}:fence`), ARGV[1] the holder id and
-- ARGV[2] its fencing token, and starts with `if not is_holder() then return -1 end`.
-- The copy holds the highest token that has written to the queue: a token at least as high
-- takes the queue over (a new holder claims every queue it serves as it takes the lease), a
-- lower one (a holder paused past its lease) is refused. The copy is in the queue's slot, so
-- every fenced script stays in one slot on Redis Cluster.
local function is_holder()
  local token = tonumber(ARGV[2])
  local cur = tonumber(redis.call('GET', KEYS[1]))
  if cur and cur > token then
    return false
  end
  if cur ~= token then
    redis.call('SET', KEYS[1], ARGV[2])
  end
  return true
end
