-- decide.lua: one authorize decision, atomic and all-or-nothing.
-- Transcribes sidecar/core/decision.py:evaluate; the shared store tests hold both to
-- the same answers.
--
-- KEYS (all under the consumer's hash tag {tenant:consumer}, so one cluster slot):
--   1 consumer hash   2 usage stream   3 wallet notices stream
--   4..8 window counters, minute hour day week month (key names carry the window start)
--   9 idempotency record (any name in the slot when ARGV 15 is '0': it is not used)
-- ARGV (those fixed for a consumer and a minute first, so the caller can reuse them):
--   1..5 reset ms of each window  6 tenant  7 consumer id
--   8 now_ms  9 request_id  10 decision_id  11 product  12 operation
--   13 cost in micros ('' = the plan's price)  14 hits
--   15 idempotency ttl ms ('0' = no record: the caller gave no request id)
--   16 api key hash ('' = consumer named by id): the key must be registered on the
--      consumer, not expired at ARGV 8 and, when it has scopes, hold the product or
--      product:operation (else invalid_key, key_expired, scope_denied)
--   17 apply-by ms (Redis clock; '0' = no limit): a decision that reaches Redis later is
--      refused with reason 'expired' and changes nothing, since its caller has already
--      answered from the fail mode and must not be charged behind its back
-- The usage record of an allowed call carries, in field 'x', the quota levels (80, 90,
-- 100% of a limit) its increment took a window across (sidecar/core/alerts.py): the
-- count moves only here, so each crossing of a window period is reported once.
-- Returns {replayed, reason, charged, balance|nil, decision_id, retry_at_ms,
--          used1..used5, limit1..limit5, notices}; -1 marks an unlimited window. `used`
--          is the count after the decision (unchanged when denied); `notices` how many
--          wallet notices this decision appended.
-- Guarantees: a denied call changes nothing; an allowed call increments every limited
-- window by `hits`, adds its cost to `spent` and appends one usage record, together;
-- a request id already allowed returns its first decision and changes nothing.
-- The wallet rules (sidecar/core/wallet_rules.py) run on the debit: the one debit that
-- takes a prepaid balance from paying for a call to not paying holds the wallet
-- (field 'hold' = since when; reason wallet_empty) and the one that takes it below the
-- auto top-up threshold appends a topup_requested notice, however many race. A held
-- wallet answers insufficient_balance until a top-up lifts the hold.

if ARGV[17] ~= '0' then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[17]) then
    return {0, 'expired', 0, false, ARGV[10], 0, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0}
  end
end

-- Without a request id nobody can retry, so there is no record to look for (the
-- caller then passes one fixed name as KEYS[9]).
if ARGV[15] ~= '0' then
  local stored = redis.call('GET', KEYS[9])
  if stored then
    local first = cmsgpack.unpack(stored)
    first[1] = 1
    return first
  end
end

-- Wallet: base is the settled balance of the last Postgres sync, spent the cumulative
-- debits made here, settled the cumulative debits Postgres had at that sync; what
-- Postgres has not settled yet is spent - settled.
local c = redis.call('HMGET', KEYS[1], 'status', 'products', 'price', 'wallet', 'base', 'spent', 'settled',
  'l_minute', 'l_hour', 'l_day', 'l_week', 'l_month', 'hold', 'saz', 'at_thr')
local used = {-1, -1, -1, -1, -1}
local limits = {-1, -1, -1, -1, -1}

local function reply(reason, charged, balance, retry_at, notices)
  return {0, reason, charged, balance, ARGV[10], retry_at,
    used[1], used[2], used[3], used[4], used[5],
    limits[1], limits[2], limits[3], limits[4], limits[5], notices or 0}
end

if not c[1] then
  -- A key naming a consumer that is gone (deleted) is an invalid key.
  return reply(ARGV[16] ~= '' and 'invalid_key' or 'unknown_consumer', 0, false, 0)
end

local unsettled_base = tonumber(c[5]) + tonumber(c[7])
local balance = unsettled_base - tonumber(c[6])
for i = 1, 5 do
  if c[7 + i] then
    limits[i] = tonumber(c[7 + i])
    used[i] = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
  end
end

if ARGV[16] ~= '' then
  -- The key's field (key.lua): '<created>' or '<created>;<expires>;<|scope|...|>'.
  local k = redis.call('HGET', KEYS[1], 'k:' .. ARGV[16])
  if not k then
    return reply('invalid_key', 0, balance, 0)
  end
  local sep = string.find(k, ';', 1, true)
  if sep then
    local sep2 = string.find(k, ';', sep + 1, true)
    local expires = string.sub(k, sep + 1, sep2 - 1)
    if expires ~= '' and tonumber(ARGV[8]) >= tonumber(expires) then
      return reply('key_expired', 0, balance, 0)
    end
    -- A scope is a product, or product:operation compared whole (sidecar/core/api_keys.py).
    local scopes = string.sub(k, sep2 + 1)
    if scopes ~= '' and not string.find(scopes, '|' .. ARGV[11] .. '|', 1, true)
        and (ARGV[12] == '' or not string.find(scopes, '|' .. ARGV[11] .. ':' .. ARGV[12] .. '|', 1, true)) then
      return reply('scope_denied', 0, balance, 0)
    end
  end
end
if c[1] ~= 'active' then
  return reply(c[1], 0, balance, 0)
end
if c[13] then
  return reply('insufficient_balance', 0, balance, 0)
end
if c[2] ~= '' and not string.find(c[2], '|' .. ARGV[11] .. '|', 1, true) then
  return reply('product_not_allowed', 0, balance, 0)
end

local hits = tonumber(ARGV[14])
local retry_at = 0
for i = 1, 5 do
  -- A denied call may only succeed once every exhausted window has reset.
  if limits[i] >= 0 and used[i] + hits > limits[i] then
    local reset = tonumber(ARGV[i])
    if reset > retry_at then retry_at = reset end
  end
end
if retry_at > 0 then
  return reply('quota_exceeded', 0, balance, retry_at)
end

local cost_text = ARGV[13]
if cost_text == '' then cost_text = c[3] end
local cost = tonumber(cost_text)
if c[4] == 'prepaid' and balance < cost then
  return reply('insufficient_balance', 0, balance, 0)
end

for i = 1, 5 do
  if limits[i] >= 0 then
    used[i] = redis.call('INCRBY', KEYS[3 + i], hits)
    if used[i] == hits then
      -- Kept 10 minutes past the reset so a late reconciliation can still read it.
      redis.call('PEXPIREAT', KEYS[3 + i], tonumber(ARGV[i]) + 600000)
    end
  end
end
local before = balance
balance = unsettled_base - redis.call('HINCRBY', KEYS[1], 'spent', cost_text)
-- With the quota levels this increment crossed (alerts.lua, prepended at load).
add_usage(KEYS[2], {'rid', ARGV[9], 'did', ARGV[10], 'ts', ARGV[8], 't', ARGV[6],
  'c', ARGV[7], 'p', ARGV[11], 'op', ARGV[12], 'cost', cost_text, 'hits', ARGV[14]}, limits, used, hits, ARGV)

-- The wallet rules on this debit (wallet_rules.lua, prepended at load).
local notices = after_debit(KEYS[1], KEYS[3], ARGV[8], before, balance, tonumber(c[3]), c[4], c[14], c[13],
  c[15])

local out = reply('ok', cost, balance, 0, notices)
if ARGV[15] ~= '0' then
  redis.call('SET', KEYS[9], cmsgpack.pack(out), 'PX', ARGV[15])
end
return out
