-- bind.lua: create or update a consumer, or apply a changed plan to a bound consumer.
-- The plan's limits, price and products are copied into the consumer's hash so a
-- decision reads one key (one cluster slot) and never the shared plan key.
--
-- KEYS: 1 consumer hash
-- ARGV: 1 mode: 'upsert' (create/update the consumer) | 'plan' (apply only if the
--         consumer is still bound to ARGV[3])
--       2 now_ms  3 plan id  4 plan version  5 price  6 products ('' or '|a|b|')
--       7..11 limits minute..month ('' = unlimited)
--       12 status ('' = keep; 'active' on create)  13 wallet mode ('' = keep; 'prepaid')
--       14 suspend at zero ('' = keep, '1', '0'; on when created)
--       15 auto top-up threshold ('' = keep, '-' = off)  16 its amount  17 its currency
-- Returns {created, plan_applied}.
-- Guarantees: a plan version never overwrites a newer version of the same plan, so a
-- plan edit racing a consumer update cannot leave stale limits behind. Counters,
-- wallet balance, its hold and keys are never touched.

local exists = redis.call('EXISTS', KEYS[1]) == 1
local bound = redis.call('HMGET', KEYS[1], 'plan', 'pver')
if ARGV[1] == 'plan' and bound[1] ~= ARGV[3] then
  return {0, 0}
end

local apply = not (bound[1] == ARGV[3] and bound[2] and tonumber(bound[2]) > tonumber(ARGV[4]))
if apply then
  redis.call('HSET', KEYS[1], 'plan', ARGV[3], 'pver', ARGV[4], 'price', ARGV[5], 'products', ARGV[6])
  local names = {'l_minute', 'l_hour', 'l_day', 'l_week', 'l_month'}
  for i = 1, 5 do
    if ARGV[6 + i] == '' then
      redis.call('HDEL', KEYS[1], names[i])
    else
      redis.call('HSET', KEYS[1], names[i], ARGV[6 + i])
    end
  end
end

if ARGV[1] == 'upsert' then
  if not exists then
    redis.call('HSET', KEYS[1], 'status', 'active', 'wallet', 'prepaid', 'base', 0, 'spent', 0, 'settled', 0,
      'created', ARGV[2])
  end
  if ARGV[12] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[12]) end
  if ARGV[13] ~= '' then redis.call('HSET', KEYS[1], 'wallet', ARGV[13]) end
  if ARGV[14] ~= '' then redis.call('HSET', KEYS[1], 'saz', ARGV[14]) end
  if ARGV[15] == '-' then
    redis.call('HDEL', KEYS[1], 'at_thr', 'at_amt', 'at_cur')
  elseif ARGV[15] ~= '' then
    redis.call('HSET', KEYS[1], 'at_thr', ARGV[15], 'at_amt', ARGV[16], 'at_cur', ARGV[17])
  end
end
redis.call('HINCRBY', KEYS[1], 'version', 1)
if exists then return {0, apply and 1 or 0} end
return {1, 1}
