-- topup.lua: credit a consumer's wallet, at most once per reference.
-- KEYS: 1 consumer hash  2 reference record (under the same hash tag)
-- ARGV: 1 amount in micros (> 0)  2 reference ttl ms  3 '1' if a reference was given
--       4 the largest balance representable exactly
-- Returns {code, balance}: code 1 applied, 0 reference already applied (nothing
-- changed), -1 unknown consumer, -2 the balance would exceed ARGV[4].
-- Guarantees: the credit and its reference record are written together or not at all.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local w = redis.call('HMGET', KEYS[1], 'base', 'pending')
local base, pending = tonumber(w[1]), tonumber(w[2])
local amount = tonumber(ARGV[1])
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  return {0, base - pending}
end
if base + amount > tonumber(ARGV[4]) then return {-2, base - pending} end
if ARGV[3] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
base = redis.call('HINCRBY', KEYS[1], 'base', amount)
redis.call('HINCRBY', KEYS[1], 'version', 1)
return {1, base - pending}
