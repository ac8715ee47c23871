-- Stamps a granted reservation with the time its request is sent. A provider counts requests
-- as they arrive, and a call waits between its reservation and its send (for its ledger row),
-- so the rolling windows count the send: scores only move later, so nothing counted stops
-- being counted sooner. A reservation that left the window meanwhile (its call waited longer
-- than the window) is counted again if the window has room; if not, nothing changes and the
-- caller waits until it frees up.
-- KEYS: 1 request window, 2 token window, 3 the token window's sum
-- ARGV: 1 now (ms), 2 reservation id, 3 estimated tokens, 4 requests/window limit,
--       5 tokens/window limit (each -1 for none), 6 window (ms)
-- Returns {1}, or {0, limit name, when it frees up (ms)}.
local now, id, est = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local w = {requests = KEYS[1], tokens = KEYS[2], sum = KEYS[3], window = tonumber(ARGV[6])}
if redis.call('ZSCORE', w.requests, id) then
  redis.call('ZADD', w.requests, 'XX', now, id)
  redis.call('ZADD', w.tokens, 'XX', now, id .. ':' .. est)
  -- Counted from now on: the keys live as long as a count made now would keep them.
  for _, key in ipairs({w.requests, w.tokens, w.sum}) do
    redis.call('PEXPIRE', key, w.window * 2)
  end
  return {1}
end
prune(w, now)
local limit, frees = full(w, now, tonumber(ARGV[4]), tonumber(ARGV[5]), est)
if limit then
  return {0, limit, frees}
end
count(w, now, id, est)
return {1}
