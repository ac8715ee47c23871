-- Records that a batch was sent: the provider's id for it and when its tasks fall back. Not
-- fenced: it records a fact about a batch this caller made, which a scheduler that lost the
-- lease meanwhile must still leave behind (else its successor could send the batch again).
-- KEYS: 1 the batch record
-- ARGV: 1 the provider's id, 2 fallback time (ms), 3 now (ms)
-- Returns 1, or 0 when the record is gone or already has a provider id.
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'remote') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'remote', ARGV[1], 'fallback', ARGV[2], 'polled', ARGV[3])
if redis.call('HGET', KEYS[1], 'state') == 'submitting' then
  redis.call('HSET', KEYS[1], 'state', 'open')
end
return 1
