-- The rolling request and token windows of a provider, shared by reserve.lua and stamp.lua.
-- `w` names the keys: w.requests (request id by time), w.tokens (`id:tokens` by time) and
-- w.sum (the tokens in the window), with w.window the window's length (ms).

-- Drops what left the window by `now`; tokens leaving it leave its sum too (only they are
-- read, not the whole window).
local function prune(w, now)
  redis.call('ZREMRANGEBYSCORE', w.requests, '-inf', now - w.window)
  local leaving = redis.call('ZRANGEBYSCORE', w.tokens, '-inf', now - w.window)
  if #leaving > 0 then
    local gone = 0
    for _, m in ipairs(leaving) do
      gone = gone + tonumber(string.match(m, ':(%d+)$') or '0')
    end
    redis.call('ZREMRANGEBYSCORE', w.tokens, '-inf', now - w.window)
    redis.call('DECRBY', w.sum, gone)
  end
end

-- Whether one more request of `est` tokens fits the limits (-1 for none): nil when it does,
-- else the limit's name and when it frees up (ms, as a string).
local function full(w, now, rpm, tpm, est)
  local function frees_at(key)
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return tostring(math.floor(tonumber(oldest[2] or now) + w.window))
  end
  if rpm >= 0 and redis.call('ZCARD', w.requests) + 1 > rpm then
    return 'rpm', frees_at(w.requests)
  end
  if tpm >= 0 then
    local sum = tonumber(redis.call('GET', w.sum) or '0')
    -- A request larger than the whole budget still goes through when the window is empty.
    if sum > 0 and sum + est > tpm then
      return 'tpm', frees_at(w.tokens)
    end
  end
  return nil
end

-- Counts request `id` of `est` tokens at `now`.
local function count(w, now, id, est)
  redis.call('ZADD', w.requests, now, id)
  redis.call('PEXPIRE', w.requests, w.window * 2)
  redis.call('ZADD', w.tokens, now, id .. ':' .. est)
  redis.call('PEXPIRE', w.tokens, w.window * 2)
  redis.call('INCRBY', w.sum, est)
  redis.call('PEXPIRE', w.sum, w.window * 2)
end
