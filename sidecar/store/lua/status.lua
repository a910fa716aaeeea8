-- status.lua: set a consumer's status (active | suspended | revoked).
-- KEYS: 1 consumer hash
-- ARGV: 1 status
-- Returns 1, or 0 when the consumer does not exist (nothing is created).
-- Guarantees: the next decision on this consumer sees the new status (same key the
-- decision reads, so no cache stands in between).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'version', 1)
return 1
