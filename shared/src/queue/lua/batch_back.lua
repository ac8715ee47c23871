-- A task of the batch path goes back to its stream, to be finished or called as any task
-- (`room` '-': it has had its turn). Its batch hash, the latch, says how: `answered` with the
-- answer, or `fallback` with the reason; its request body is dropped, and it outlives the
-- task's deadline by `latch_ms`, after which no task can be parked again. Used by settling,
-- the workers' rescue, and a park that found no scheduler.
local function batch_back(stream, key, state, field, value, env, deadline, now, latch_ms)
  redis.call('HSET', key, 'state', state, field, value)
  redis.call('HDEL', key, 'body')
  redis.call('PEXPIRE', key, math.max(deadline - now, 0) + latch_ms)
  redis.call('XADD', stream, '*', 'task', env, 'room', '-')
end
