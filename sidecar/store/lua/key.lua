-- key.lua: register or revoke an API key hash on its consumer.
-- KEYS: 1 consumer hash
-- ARGV: 1 'add' | 'del'  2 SHA-256 hex of the key  3 ('add') when it was registered,
--       ms ('1': not known)
-- Returns for 'add': 1, or -1 when the consumer does not exist (nothing created);
--         for 'del': 1 if the key was registered, 0 otherwise.
-- Guarantees: the consumer hash is the authority a decision checks (decide.lua), so a
-- revoked key is refused by the very next decision whatever any cache says. A key
-- registered again keeps its first registration time.
if ARGV[1] == 'add' then
  if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
  redis.call('HSETNX', KEYS[1], 'k:' .. ARGV[2], ARGV[3])
  return 1
end
return redis.call('HDEL', KEYS[1], 'k:' .. ARGV[2])
