-- Sets cancel marks on one queue: workers end the work a mark names where they meet it
-- (reading it, before a call, during one) and never run it.
-- KEYS: 1 the queue's marks (zset of mark -> when set, ms), 2.. the results of the tasks the
--       first task marks name, in their order
-- ARGV: 1 how long a mark lives (ms), 2.. the marks: `task:<id>` or `queued:<id>` first (as
--       many as there are result keys), then any `batch:<id>` and `tenant:<name>`
-- Returns, for each mark, when it was set (ms, as text), or the status of the task it names
-- when that task had already ended: then nothing is set, for nothing is left to cancel.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[1])))
local final = {succeeded = true, failed = true, dead = true, cancelled = true}
local out = {}
for i = 2, #ARGV do
  local ended
  if KEYS[i] then
    local raw = redis.call('GET', KEYS[i])
    if raw then
      local ok, r = pcall(cjson.decode, raw)
      if ok and type(r) == 'table' and final[r.status] then
        ended = r.status
      end
    end
  end
  if ended then
    out[#out + 1] = ended
  else
    -- GT: a mark set again only ever covers more (a tenant's, work queued until later).
    redis.call('ZADD', KEYS[1], 'GT', now, ARGV[i])
    out[#out + 1] = tostring(now)
  end
end
return out
