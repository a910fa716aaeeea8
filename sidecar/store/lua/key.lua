-- key.lua: register or revoke an API key hash on its consumer.
-- KEYS: 1 consumer hash (slot of {tenant:consumer})
-- ARGV: 1 'add' | 'del'  2 SHA-256 hex of the key
--       3 ('add') the key's field value: '<created ms>' ('1': not known), or
--         '<created ms>;<expires ms or empty>;<scopes as |s1|s2| or empty>' for a key
--         with an expiry or scopes (read by decide.lua)
-- Returns for 'add': 1, or -1 when the consumer does not exist (nothing created);
--         for 'del': 1 if the key was registered, 0 otherwise.
-- Guarantees: the consumer hash is the authority a decision checks (decide.lua), so a
-- revoked key, an expiry or a scope change is seen by the very next decision whatever
-- any cache says. A key registered again keeps its first registration time and takes
-- the new expiry and scopes.
local field = 'k:' .. ARGV[2]
if ARGV[1] == 'add' then
  if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
  local value = ARGV[3]
  local first = redis.call('HGET', KEYS[1], field)
  if first then
    value = string.match(first, '^[^;]*') .. string.match(value, '^[^;]*(.*)$')
  end
  redis.call('HSET', KEYS[1], field, value)
  return 1
end
return redis.call('HDEL', KEYS[1], field)
