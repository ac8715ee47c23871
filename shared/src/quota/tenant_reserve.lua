-- Reserves calls of one tenant, each its estimated tokens and cost, against every limit of
-- the tenant, in the order asked: each is granted or refused as if it came alone, and a
-- refused one changes nothing. Shared by every worker, so that however many race, the
-- tenant's reserved and spent dollars never pass a budget (a call is reserved at its
-- estimate, `max_tokens` included, and settled at its cost later: Limiter::settle_tenant).
-- A worker asks for the calls of the tenant that wait for a reservation at once (one ask in
-- flight per tenant, the next gathered meanwhile), so a busy tenant costs one script for
-- many calls.
-- `rpm` and `tpm` are paces (GCRA): each holds when the next call may go, so the tenant's
-- calls go out evenly spaced and no window ever holds more than the limit. A call whose
-- slot is near (within `horizon`) is granted that slot and waits for it; one further is
-- refused until its slot comes closer.
-- KEYS: 1 micro-dollars today, 2 micro-dollars this month, 3 the request pace, 4 the token
--       pace, 5 calls in flight, 6 alerts
-- ARGV: 1 now (ms), 2 micro-dollars/day limit, 3 micro-dollars/month limit, 4 requests/
--       minute limit, 5 tokens/minute limit, 6 calls in flight limit (each -1 for none),
--       7 the minute (ms), 8 next day (ms), 9 next month (ms), 10 how long a call in flight
--       counts should its worker die (ms), 11 day label, 12 month label, 13 horizon (ms),
--       then per call: its reservation id, estimated tokens, estimated micro-dollars
-- Returns three values per call, {1, wait (ms), ''} or {0, limit name, when it frees up
-- (ms)}, then the `kind:percent` budget thresholds passed for the first time this day or
-- month.
local now = tonumber(ARGV[1])
local day_limit, month_limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local rpm, tpm, max_in_flight = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local minute, lease, horizon = tonumber(ARGV[7]), tonumber(ARGV[10]), tonumber(ARGV[13])

local day_used = day_limit >= 0 and tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local month_used = month_limit >= 0 and tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local day_before, month_before = day_used, month_used
local rpm_tat = rpm >= 0 and math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), now) or nil
local tpm_tat = tpm >= 0 and math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), now) or nil
local flying
if max_in_flight >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  flying = redis.call('ZCARD', KEYS[5])
end
local out, paced = {}, false
for i = 14, #ARGV, 3 do
  local tokens, usd = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local slot = math.max(now, rpm_tat or now, tpm_tat or now)
  if day_limit >= 0 and day_used + usd > day_limit then
    out[#out + 1], out[#out + 2], out[#out + 3] = 0, 'budget_usd_day', ARGV[8]
  elseif month_limit >= 0 and month_used + usd > month_limit then
    out[#out + 1], out[#out + 2], out[#out + 3] = 0, 'budget_usd_month', ARGV[9]
  elseif slot - now > horizon then
    out[#out + 1], out[#out + 2], out[#out + 3] = 0,
      (rpm_tat and rpm_tat == slot) and 'rpm' or 'tpm', string.format('%.0f', slot - horizon)
  elseif flying and flying >= max_in_flight then
    -- A call's end frees a place at any moment: look again soon.
    out[#out + 1], out[#out + 2], out[#out + 3] = 0, 'max_in_flight', tostring(now + 250)
  else
    if rpm_tat then
      rpm_tat = slot + minute / rpm
    end
    if tpm_tat then
      tpm_tat = slot + minute * math.max(tokens, 1) / tpm
    end
    paced = paced or rpm_tat ~= nil or tpm_tat ~= nil
    if flying then
      flying = flying + 1
      redis.call('ZADD', KEYS[5], now + lease, ARGV[i])
    end
    day_used, month_used = day_used + usd, month_used + usd
    out[#out + 1], out[#out + 2], out[#out + 3] = 1, string.format('%.0f', slot - now), ''
  end
end
if paced and rpm_tat then
  redis.call('SET', KEYS[3], string.format('%.3f', rpm_tat), 'PX', math.ceil(rpm_tat - now + minute))
end
if paced and tpm_tat then
  redis.call('SET', KEYS[4], string.format('%.3f', tpm_tat), 'PX', math.ceil(tpm_tat - now + minute))
end
if flying then
  redis.call('PEXPIRE', KEYS[5], lease * 2)
end
-- A counter made now gets its expiry: a day past its day or month.
local function add(key, more, ends)
  if more > 0 and redis.call('INCRBY', key, more) == more then
    redis.call('PEXPIRE', key, ends - now + 86400000)
  end
end
if day_limit >= 0 then
  add(KEYS[1], day_used - day_before, tonumber(ARGV[8]))
end
if month_limit >= 0 then
  add(KEYS[2], month_used - month_before, tonumber(ARGV[9]))
end
-- 80 % and 100 % of a budget, announced once each day or month.
local function crossed(kind, label, before, after, limit, ends)
  if limit <= 0 then return end
  for _, pct in ipairs({80, 100}) do
    local mark = limit * pct / 100
    if before < mark and after >= mark
        and redis.call('HSETNX', KEYS[6], kind .. ':' .. label .. ':' .. pct, now) == 1 then
      redis.call('PEXPIRE', KEYS[6], ends - now + 86400000)
      out[#out + 1] = kind .. ':' .. pct
    end
  end
end
crossed('budget_usd_day', ARGV[11], day_before, day_used, day_limit, tonumber(ARGV[9]))
crossed('budget_usd_month', ARGV[12], month_before, month_used, month_limit, tonumber(ARGV[9]))
return out
