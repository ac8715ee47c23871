-- Reserves one call of a tenant, its estimated tokens and cost, against every limit of the
-- tenant, or refuses without changing anything: shared by every worker, so that however
-- many race, the tenant's reserved and spent dollars never pass a budget (a call is
-- reserved at its estimate, `max_tokens` included, and settled at its cost).
-- KEYS: 1 micro-dollars today, 2 micro-dollars this month, 3 request window, 4 token window,
--       5 the token window's sum, 6 calls in flight, 7 alerts
-- ARGV: 1 now (ms), 2 reservation id, 3 estimated tokens, 4 estimated micro-dollars,
--       5 micro-dollars/day limit, 6 micro-dollars/month limit, 7 requests/window limit,
--       8 tokens/window limit, 9 calls in flight limit (each -1 for none), 10 window (ms),
--       11 next day (ms), 12 next month (ms), 13 how long a call in flight counts should
--       its worker die (ms), 14 day label, 15 month label
-- Returns {1, crossed...} where crossed are `kind:percent` thresholds passed for the first
-- time this day or month, or {0, limit name, when it frees up (ms), used (micro-dollars, for
-- a budget)}.
local now, id = tonumber(ARGV[1]), ARGV[2]
local est_tokens, est_usd = tonumber(ARGV[3]), tonumber(ARGV[4])
local day_limit, month_limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local rpm, tpm, max_in_flight = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local w = {requests = KEYS[3], tokens = KEYS[4], sum = KEYS[5], window = tonumber(ARGV[10])}

local day_used = tonumber(redis.call('GET', KEYS[1]) or '0')
if day_limit >= 0 and day_used + est_usd > day_limit then
  return {0, 'budget_usd_day', ARGV[11], day_used}
end
local month_used = tonumber(redis.call('GET', KEYS[2]) or '0')
if month_limit >= 0 and month_used + est_usd > month_limit then
  return {0, 'budget_usd_month', ARGV[12], month_used}
end
if rpm >= 0 or tpm >= 0 then
  prune(w, now)
  local limit, frees = full(w, now, rpm, tpm, est_tokens)
  if limit then
    return {0, limit, frees, 0}
  end
end
if max_in_flight >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now)
  if redis.call('ZCARD', KEYS[6]) >= max_in_flight then
    -- A call's end frees a place at any moment: look again soon.
    return {0, 'max_in_flight', tostring(now + 250), 0}
  end
end

if day_limit >= 0 then
  redis.call('INCRBY', KEYS[1], est_usd)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[11]) - now + 86400000)
end
if month_limit >= 0 then
  redis.call('INCRBY', KEYS[2], est_usd)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[12]) - now + 86400000)
end
if rpm >= 0 or tpm >= 0 then
  count(w, now, id, est_tokens)
end
if max_in_flight >= 0 then
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[13]), id)
  redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[13]) * 2)
end

local out = {1}
local function crossed(kind, label, after, limit)
  if limit <= 0 then return end
  for _, pct in ipairs({80, 100}) do
    if after >= limit * pct / 100
        and redis.call('HSETNX', KEYS[7], kind .. ':' .. label .. ':' .. pct, now) == 1 then
      out[#out + 1] = kind .. ':' .. pct
    end
  end
end
if day_limit >= 0 or month_limit >= 0 then
  crossed('budget_usd_day', ARGV[14], day_used + est_usd, day_limit)
  crossed('budget_usd_month', ARGV[15], month_used + est_usd, month_limit)
  redis.call('PEXPIRE', KEYS[7], tonumber(ARGV[12]) - now + 86400000)
end
return out
