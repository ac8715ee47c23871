-- Fenced writes, for the scheduler's lease holder only. Every fenced script takes
-- KEYS[1] the lease, KEYS[2] the fence counter, ARGV[1] the holder id, ARGV[2] its token,
-- and starts with `if not is_holder() then return -1 end`.
local function is_holder()
  return redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2]
end
