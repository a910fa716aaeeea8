-- topup.lua: credit a consumer's wallet, at most once.
-- KEYS: 1 consumer hash  2 reference record  3 wallet notices stream (same hash tag)
-- ARGV: 1 amount in micros (> 0)  2 reference ttl ms  3 '1' if a reference was given
--       4 the largest balance representable exactly
--       5 wallet version of this credit in Postgres ('' without Postgres)  6 now ms
-- Returns {code, balance}: code 1 applied, 0 already applied (nothing changed), -1
-- unknown consumer, -2 the balance would exceed ARGV[4].
-- A credit that brings a held wallet (wallet_empty) above zero lifts the hold and
-- appends a 'resumed' notice (after_credit, wallet_rules.lua); a manual status is
-- never touched.
-- Guarantees: the credit and its reference record are written together or not at all;
-- with a Postgres version, a credit that a newer wallet sync already carries (wver at
-- or above it) is not added again.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end
local w = redis.call('HMGET', KEYS[1], 'base', 'spent', 'settled', 'wver')
local base = tonumber(w[1])
local balance = base - tonumber(w[2]) + tonumber(w[3])
local amount = tonumber(ARGV[1])
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  return {0, balance}
end
if ARGV[5] ~= '' and w[4] and tonumber(w[4]) >= tonumber(ARGV[5]) then
  return {0, balance}
end
if base + amount > tonumber(ARGV[4]) then return {-2, balance} end
if ARGV[3] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2]) end
redis.call('HINCRBY', KEYS[1], 'base', amount)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'wver', ARGV[5]) end
redis.call('HINCRBY', KEYS[1], 'version', 1)
after_credit(KEYS[1], KEYS[3], ARGV[6], balance + amount)
return {1, balance + amount}
