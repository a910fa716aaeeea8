-- plan.lua: store a plan definition at a version, never going back to an older one.
-- KEYS: 1 plan hash
-- ARGV: 1 version ('' = the next version: embedded use without Postgres)  2 plan JSON
-- Returns the version the plan now has, or 0 if a newer version was already there.
-- Guarantees: concurrent writers (admin API, reconciler) leave the newest version.
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local version = tonumber(ARGV[1] ~= '' and ARGV[1] or (current + 1))
if version < current then return 0 end
redis.call('HSET', KEYS[1], 'version', version, 'spec', ARGV[2])
return version
