-- plan_delete.lua: remove a plan, unless consumers are still bound to it.
-- KEYS (all under the tenant's hash tag {tenant}, so one cluster slot):
--   1 plan hash  2 plan member set  3 the tenant's plan index (sorted set)
-- ARGV: 1 plan id  2 '1' to remove it even with members (the truth no longer has it)
-- Returns {code, members}: code 1 removed, 0 there was no such plan, -1 refused
-- because `members` consumers are bound to it (nothing changed).
-- Guarantees: a consumer joins the member set before it reads the plan (see
-- RedisStore.put_consumer), so a plan is never removed under a consumer binding to it.
local members = redis.call('SCARD', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return {0, members}
end
if members > 0 and ARGV[2] ~= '1' then
  return {-1, members}
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return {1, members}
