-- May a call go to this provider and model now? One round trip for both circuits.
-- KEYS: 1-4 the provider's circuit (open, tripped, probe, failures),
--       5-8 the model's circuit (same order)
-- ARGV: 1 probe lease (ms), 2 who asks
-- Returns {verdict, scope, wait ms, text, probes, dirty}:
--   verdict 'wait': scope 'provider' or 'model' is open (text: '<since ms>|<reason>') or
--     being probed by another worker (text: the reason it opened); wait ms: how long at most.
--   verdict 'ok': probes is a bit mask of the probes this caller now holds (1 provider,
--     2 model); dirty is 1 when a failure counter is running, so a success must reset it.
local function look(base, label)
  local open = redis.call('GET', KEYS[base])
  if open then
    return {'wait', label, redis.call('PTTL', KEYS[base]), open}
  end
  local tripped = redis.call('GET', KEYS[base + 1])
  if tripped then
    if redis.call('SET', KEYS[base + 2], ARGV[2], 'NX', 'PX', ARGV[1]) then
      return {'probe'}
    end
    return {'wait', label, redis.call('PTTL', KEYS[base + 2]), tripped, 'probing'}
  end
  return nil
end

local provider = look(1, 'provider')
if provider and provider[1] == 'wait' then
  return provider
end
local model = look(5, 'model')
if model and model[1] == 'wait' then
  if provider then
    -- Give back the provider probe taken a moment ago: this call will not be made.
    redis.call('DEL', KEYS[3])
  end
  return model
end
local probes = 0
if provider then probes = probes + 1 end
if model then probes = probes + 2 end
local dirty = redis.call('EXISTS', KEYS[4], KEYS[8])
return {'ok', '', 0, '', probes, dirty}
