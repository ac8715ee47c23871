-- Reserves one request and its estimated tokens and cost against every limit of a provider,
-- or refuses without changing anything. Shared by every worker, so two workers can never
-- both take the last request or spend the last dollar.
-- KEYS: 1 requests today, 2 micro-dollars this month, 3 request window, 4 token window,
--       5 alerts, 6 the token window's sum, 7 the request pace, 8 the token pace,
--       9 the line, 10 when each in the line must be back, 11 the tokens a call uses (the
--       token pace's mean, reconcile.lua), 12 the token pace's slack (reconcile.lua)
-- ARGV: 1 now (ms), 2 reservation id, 3 estimated tokens, 4 estimated micro-dollars,
--       5 requests/day limit, 6 micro-dollars/month limit, 7 requests/window limit,
--       8 tokens/window limit (each -1 for none), 9 window (ms), 10 next day (ms),
--       11 next month (ms), 12 day label, 13 month label, 14 the call's priority,
--       15 the reserved shares: `<priority>:<percent>` comma-separated, or '',
--       16 burst (requests beyond the steady pace), 17 the asker (a task's id: it may wait
--       in the line) or '' (it may not), 18 when the asker first asked for this call (ms)
-- A reserved share holds `percent` of rpm and tpm for its priority while that priority has
-- asked within the window (under a pace: while a task of it waits in the line): every other
-- priority's call must leave the unused rest of it free. A priority that has not asked
-- holds nothing back (idle capacity is lent freely). Under a pace, the line gives a waiting
-- priority the next slot anyway, so holding a share a whole window after its last task
-- would only leave slots unused; an asker whose own share is not used up goes ahead of the
-- other priorities in the line.
-- With shares set, each priority has its own window keys beside the provider's
-- (`<key>:<p>`), and each priority with a share the time it last asked
-- (`<request window>:asked:<p>`).
-- Pacing: rpm and tpm are spent as a steady flow (GCRA: each pace key holds the theoretical
-- arrival time of the next call), `burst` requests ahead of it at most, so a flood never
-- spends a window's budget in its first seconds; the window's log stays the hard cap. A
-- burst costs a gap a window later, when the log is full and the pace ahead of it.
-- The line: who gets the next slot. An asker refused while its slot is within the horizon
-- (two intervals of the pace, 500 ms at least) waits in the line, ordered by priority and
-- then by when it first asked (a waiter back late, after it left, comes in at that place
-- again, at most a window old), and must be back by its slot and a grace; a slot open now
-- goes to the head of the line, so a priority that asks gets the next slot. An asker whose
-- slot is further hands its task back (to the room, whose order decides who asks next).
-- tpm's pace is charged what calls use (the mean of the calls reconciled), not their
-- estimate: a reservation counts `max_tokens` whole against the window, as providers do,
-- and a pace charged that would keep every other call away until the answer is in.
-- Returns {1, thousandths of tokens charged to the pace, crossed...} where crossed are `kind:percent`
-- thresholds passed for the first time this window, or {0, limit name, when it frees up (ms), 1 when the asker waits in
-- the line else 0}.
local now, id = tonumber(ARGV[1]), ARGV[2]
local est_tokens, est_usd = tonumber(ARGV[3]), tonumber(ARGV[4])
local rpd_limit, usd_limit = tonumber(ARGV[5]), tonumber(ARGV[6])
local rpm_limit, tpm_limit = tonumber(ARGV[7]), tonumber(ARGV[8])
local window = tonumber(ARGV[9])
local rpm_pace = tonumber(ARGV[7]) > 0 and window / tonumber(ARGV[7]) or nil
local tpm_pace = tonumber(ARGV[8]) > 0 and window / tonumber(ARGV[8]) or nil
-- How far calls may run ahead of the pace: `burst` intervals (without rpm, an interval is
-- 1 % of the window), and 50 ms more, for callers back a moment late and for clocks in
-- whole milliseconds (a fast limit has several calls a millisecond). Only what runs ahead
-- of the pace can meet the log's cap, and then waits for it no longer.
local interval = rpm_pace or window / 100
local tolerance = tonumber(ARGV[16]) * interval + 50
-- `burst: <rpm>` runs a whole window ahead: no pace, and no line.
local pacing = (rpm_pace or tpm_pace) and tolerance < window
local line, back = KEYS[9], KEYS[10]
if pacing then
  -- Who did not come back by their slot and a grace leaves the line.
  local gone = redis.call('ZRANGEBYSCORE', back, '-inf', now, 'LIMIT', 0, 100)
  if #gone > 0 then
    redis.call('ZREM', line, unpack(gone))
    redis.call('ZREM', back, unpack(gone))
  end
end
-- How many tasks of priority `q` wait in the line (their scores are q * 1e13 + first ask).
local function waiting(q)
  return redis.call('ZCOUNT', line, string.format('%.0f', q * 1e13),
    '(' .. string.format('%.0f', (q + 1) * 1e13))
end

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
-- `unmet`: the asker's own share is not used up; `held_waiting`: priority -> its tasks in
-- the line, for each other priority whose share is held for them.
local mine, unmet, held_waiting = nil, false, {}
if shares ~= '' then
  local held_r, held_t = 0, 0
  for q, pct in string.gmatch(shares, '(%d+):(%d+)') do
    local wq = {requests = KEYS[3] .. ':' .. q, tokens = KEYS[4] .. ':' .. q,
      sum = KEYS[6] .. ':' .. q, window = window}
    -- What is left of the share in this window.
    local function left()
      prune(wq, now)
      local r, t = 0, 0
      if rpm_limit >= 0 then
        r = math.max(0, math.floor(rpm_limit * tonumber(pct) / 100) - redis.call('ZCARD', wq.requests))
      end
      if tpm_limit >= 0 then
        t = math.max(0, math.floor(tpm_limit * tonumber(pct) / 100)
          - tonumber(redis.call('GET', wq.sum) or '0'))
      end
      return r, t
    end
    if q == priority then
      mine = wq
      if pacing then
        local r, t = left()
        unmet = r > 0 or t > 0
      else
        redis.call('SET', KEYS[3] .. ':asked:' .. q, now, 'PX', window * 2)
      end
    else
      local waiters = pacing and waiting(tonumber(q)) or 0
      if waiters > 0 or (not pacing and
          tonumber(redis.call('GET', KEYS[3] .. ':asked:' .. q) or '-1') > now - window) then
        local r, t = left()
        held_r, held_t = held_r + r, held_t + t
        if r > 0 or t > 0 then
          held_waiting[tonumber(q)] = waiters
        end
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
-- The earliest time the log and the pace let a call through.
local limit, next = full(w, now, rpm_limit, tpm_limit, est_tokens)
next = tonumber(next or now)
-- What this call costs the token pace.
local charge = est_tokens
if tpm_pace then
  local mean = tonumber(redis.call('GET', KEYS[11]) or '')
  charge = mean and math.min(est_tokens, mean) or est_tokens
end
local function paced(key, name)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat - tolerance > next then
    limit, next = limit or name, tat - tolerance
  end
  return tat
end
local rpm_tat = rpm_pace and paced(KEYS[7], 'rpm')
local tpm_tat = tpm_pace and paced(KEYS[8], 'tpm')
-- The line, only under a pace: who is ahead (of the asker's own priority only, while its
-- share is not used up), and the tasks of other priorities whose shares are held.
local asker = ARGV[17]
local place, score, ahead = false, 0, 0
if pacing then
  place = asker ~= '' and redis.call('ZSCORE', line, asker)
  local since = tonumber(ARGV[18])
  since = since > 0 and math.min(now, math.max(since, now - window)) or now
  score = tonumber(place or (tonumber(priority) * 1e13 + since))
  local from = unmet and string.format('%.0f', tonumber(priority) * 1e13) or '-inf'
  ahead = redis.call('ZCOUNT', line, from, '(' .. string.format('%.0f', score))
  -- Tasks whose share is held go first: the more urgent of them before an asker whose own
  -- share is unmet (the others are counted above), the less urgent before any other.
  for q, n in pairs(held_waiting) do
    if (unmet and q < tonumber(priority)) or (not unmet and q > tonumber(priority)) then
      ahead = ahead + n
    end
  end
else
  asker = ''
end
if limit or ahead > 0 then
  local step = rpm_pace or (tpm_pace * math.max(charge, 1))
  local slot = math.floor(math.max(next, now) + ahead * step)
  local horizon = math.max(2 * step, 500)
  local waits = 0
  if asker ~= '' and slot <= now + horizon then
    redis.call('ZADD', line, score, asker)
    redis.call('ZADD', back, slot + math.min(horizon, math.max(step, 1000)), asker)
    redis.call('PEXPIRE', line, window * 2)
    redis.call('PEXPIRE', back, window * 2)
    waits = 1
  elseif place then
    redis.call('ZREM', line, asker)
    redis.call('ZREM', back, asker)
  end
  return {0, limit or (rpm_pace and 'rpm' or 'tpm'), string.format('%.0f', slot), waits}
end
if place then
  redis.call('ZREM', line, asker)
  redis.call('ZREM', back, asker)
end
-- A call up to 50 ms behind the pace keeps its schedule: when calls flow at the limit, the
-- log is full at every slot, and a call whose predecessor a window ago was sent a moment
-- late waits that moment; a pace counted from then would lose it, at every call.
if rpm_pace then
  local tat = math.max(rpm_tat, now - 50) + rpm_pace
  redis.call('SET', KEYS[7], string.format('%.3f', tat), 'PX', math.ceil(tat - now + window))
end
if tpm_pace then
  -- The token pace keeps its schedule further behind while calls give time back (the slack,
  -- reconcile.lua): a call that used less than its charge moves the pace back, but those
  -- told their slots in the line come at them, and the time between would be lost.
  -- Never so far that the next call could go out sooner than the burst lets it. The slack
  -- is not used up by a grant: it is how far behind the pace the slots told stand, for as
  -- long as calls give time back (reconcile.lua sets it, with a lifetime).
  local step = tpm_pace * charge
  local slack = math.min(tonumber(redis.call('GET', KEYS[12]) or '0'), step - tolerance - 51)
  local tat = math.max(tpm_tat, now - 50 - math.max(slack, 0)) + step
  redis.call('SET', KEYS[8], string.format('%.3f', tat), 'PX', math.ceil(tat - now + window))
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

local out = {1, math.floor(charge * 1000 + 0.5)}
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
