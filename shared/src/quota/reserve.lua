-- Reserves one request and its estimated tokens and cost against every limit of a provider,
-- or refuses without changing anything. Shared by every worker, so two workers can never
-- both take the last request or spend the last dollar.
-- KEYS: 1 requests today, 2 micro-dollars this month, 3 request window, 4 token window,
--       5 alerts, 6 the token window's sum
-- ARGV: 1 now (ms), 2 reservation id, 3 estimated tokens, 4 estimated micro-dollars,
--       5 requests/day limit, 6 micro-dollars/month limit, 7 requests/window limit,
--       8 tokens/window limit (each -1 for none), 9 window (ms), 10 next day (ms),
--       11 next month (ms), 12 day label, 13 month label, 14 the call's priority,
--       15 the reserved shares: `<priority>:<percent>` comma-separated, or ''
-- A reserved share holds `percent` of rpm and tpm for its priority while that priority has
-- asked within the window: every other priority's call must leave the unused rest of it
-- free. A priority that has not asked holds nothing back (idle capacity is lent freely).
-- With shares set, each priority has its own window keys beside the provider's
-- (`<key>:<p>`), and each priority with a share the time it last asked
-- (`<request window>:asked:<p>`).
-- Returns {1, crossed...} where crossed are `kind:percent` thresholds passed for the first
-- time this window, or {0, limit name, when it frees up (ms)}.
local now, id = tonumber(ARGV[1]), ARGV[2]
local est_tokens, est_usd = tonumber(ARGV[3]), tonumber(ARGV[4])
local rpd_limit, usd_limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local rpm_limit, tpm_limit = tonumber(ARGV[7]), tonumber(ARGV[8])
local window = tonumber(ARGV[9])

local w = {requests = KEYS[3], tokens = KEYS[4], sum = KEYS[6], window = window}
prune(w, now)

local rpd_used = tonumber(redis.call('GET', KEYS[1]) or '0')
if rpd_limit >= 0 and rpd_used + 1 > rpd_limit then
  return {0, 'requests_per_day', ARGV[10]}
end
local usd_used = tonumber(redis.call('GET', KEYS[2]) or '0')
if usd_limit >= 0 and usd_used + est_usd > usd_limit then
  return {0, 'usd_per_month', ARGV[11]}
end
local priority, shares = ARGV[14], ARGV[15]
local mine
if shares ~= '' then
  local held_r, held_t = 0, 0
  for q, pct in string.gmatch(shares, '(%d+):(%d+)') do
    local wq = {requests = KEYS[3] .. ':' .. q, tokens = KEYS[4] .. ':' .. q,
      sum = KEYS[6] .. ':' .. q, window = window}
    if q == priority then
      mine = wq
      redis.call('SET', KEYS[3] .. ':asked:' .. q, now, 'PX', window * 2)
    elseif tonumber(redis.call('GET', KEYS[3] .. ':asked:' .. q) or '-1') > now - window then
      prune(wq, now)
      if rpm_limit >= 0 then
        held_r = held_r + math.max(0,
          math.floor(rpm_limit * tonumber(pct) / 100) - redis.call('ZCARD', wq.requests))
      end
      if tpm_limit >= 0 then
        held_t = held_t + math.max(0,
          math.floor(tpm_limit * tonumber(pct) / 100) - tonumber(redis.call('GET', wq.sum) or '0'))
      end
    end
  end
  if rpm_limit >= 0 then
    rpm_limit = rpm_limit - held_r
  end
  if tpm_limit >= 0 then
    tpm_limit = math.max(tpm_limit - held_t, 1)
  end
  -- A priority without a share is counted too, so each priority's use of the window shows.
  mine = mine or {requests = KEYS[3] .. ':' .. priority, tokens = KEYS[4] .. ':' .. priority,
    sum = KEYS[6] .. ':' .. priority, window = window}
end
local limit, frees = full(w, now, rpm_limit, tpm_limit, est_tokens)
if limit then
  return {0, limit, frees}
end

redis.call('INCR', KEYS[1])
-- Relative expiries, so a caller's clock (tests drive it) is all that decides windows.
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[10]) - now + 86400000)
redis.call('INCRBY', KEYS[2], est_usd)
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[11]) - now + 86400000)
count(w, now, id, est_tokens)
if mine then
  prune(mine, now)
  count(mine, now, id, est_tokens)
end

local out = {1}
local function crossed(kind, label, after, limit)
  if limit <= 0 then return end
  for _, pct in ipairs({50, 80, 90}) do
    local mark = limit * pct / 100
    if after >= mark and redis.call('HSETNX', KEYS[5], kind .. ':' .. label .. ':' .. pct, now) == 1 then
      out[#out + 1] = kind .. ':' .. pct
    end
  end
end
crossed('requests_per_day', ARGV[12], rpd_used + 1, rpd_limit)
crossed('usd_per_month', ARGV[13], usd_used + est_usd, usd_limit)
redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[11]) - now + 86400000)
return out
