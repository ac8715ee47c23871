-- Reserves one call of a tenant, its estimated tokens and cost, against every limit of the
-- tenant, or refuses without changing anything: shared by every worker, so that however
-- many race, the tenant's reserved and spent dollars never pass a budget (a call is
-- reserved at its estimate, `max_tokens` included, and settled at its cost later, which
-- only lowers the count: Limiter::settle_tenant).
-- `rpm` and `tpm` are paces (GCRA): each holds when the next call may go, so calls of the
-- tenant go out evenly spaced and no window ever holds more than the limit. A call whose
-- slot is near (within `horizon`) is granted that slot and waits for it; one further is
-- refused until its slot comes closer.
-- KEYS: 1 micro-dollars today, 2 micro-dollars this month, 3 the request pace, 4 the token
--       pace, 5 calls in flight, 6 alerts
-- ARGV: 1 now (ms), 2 reservation id, 3 estimated tokens, 4 estimated micro-dollars,
--       5 micro-dollars/day limit, 6 micro-dollars/month limit, 7 requests/minute limit,
--       8 tokens/minute limit, 9 calls in flight limit (each -1 for none), 10 the minute
--       (ms), 11 next day (ms), 12 next month (ms), 13 how long a call in flight counts
--       should its worker die (ms), 14 day label, 15 month label, 16 horizon (ms)
-- Returns {1, wait (ms), crossed...} where crossed are `kind:percent` thresholds passed for
-- the first time this day or month, or {0, limit name, when it frees up (ms)}.
local now = tonumber(ARGV[1])
local est_tokens, est_usd = tonumber(ARGV[3]), tonumber(ARGV[4])
local day_limit, month_limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local rpm, tpm, max_in_flight = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local minute, horizon = tonumber(ARGV[10]), tonumber(ARGV[16])

local day_used, month_used = 0, 0
if day_limit >= 0 then
  day_used = tonumber(redis.call('GET', KEYS[1]) or '0')
  if day_used + est_usd > day_limit then
    return {0, 'budget_usd_day', ARGV[11]}
  end
end
if month_limit >= 0 then
  month_used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if month_used + est_usd > month_limit then
    return {0, 'budget_usd_month', ARGV[12]}
  end
end
-- The slot each pace gives: the later of now and when its next call is due.
local slot, rpm_tat, tpm_tat = now, nil, nil
if rpm >= 0 then
  rpm_tat = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), now)
  slot = math.max(slot, rpm_tat)
end
if tpm >= 0 then
  tpm_tat = math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), now)
  slot = math.max(slot, tpm_tat)
end
if slot - now > horizon then
  return {0, (rpm_tat == slot) and 'rpm' or 'tpm', string.format('%.0f', slot - horizon)}
end
if max_in_flight >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if redis.call('ZCARD', KEYS[5]) >= max_in_flight then
    -- A call's end frees a place at any moment: look again soon.
    return {0, 'max_in_flight', tostring(now + 250)}
  end
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[13]), ARGV[2])
  redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[13]) * 2)
end
if rpm_tat then
  local next = math.max(rpm_tat, slot) + minute / rpm
  redis.call('SET', KEYS[3], string.format('%.3f', next), 'PX', math.ceil(next - now + minute))
end
if tpm_tat then
  local next = math.max(tpm_tat, slot) + minute * math.max(est_tokens, 1) / tpm
  redis.call('SET', KEYS[4], string.format('%.3f', next), 'PX', math.ceil(next - now + minute))
end
-- A counter made now gets its expiry: a day past its day or month.
if day_limit >= 0 and redis.call('INCRBY', KEYS[1], est_usd) == est_usd then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[11]) - now + 86400000)
end
if month_limit >= 0 and redis.call('INCRBY', KEYS[2], est_usd) == est_usd then
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[12]) - now + 86400000)
end

local out = {1, string.format('%.0f', slot - now)}
-- 80 % and 100 % of a budget, announced once each day or month.
local function crossed(kind, label, before, limit)
  if limit <= 0 then return end
  for _, pct in ipairs({80, 100}) do
    local mark = limit * pct / 100
    if before < mark and before + est_usd >= mark
        and redis.call('HSETNX', KEYS[6], kind .. ':' .. label .. ':' .. pct, now) == 1 then
      redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[12]) - now + 86400000)
      out[#out + 1] = kind .. ':' .. pct
    end
  end
end
crossed('budget_usd_day', ARGV[14], day_used, day_limit)
crossed('budget_usd_month', ARGV[15], month_used, month_limit)
return out
