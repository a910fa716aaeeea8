-- wallet_rules.lua: the wallet rules of sidecar/core/wallet_rules.py, prepended to the
-- scripts that debit or credit a wallet (decide.lua, event.lua, topup.lua, settle.lua)
-- when they are loaded; it touches only the keys its caller passes (one slot).
-- Notices go to the consumer's notices stream, capped near 10,000 entries.

local function notice(stream, kind, now, balance, ...)
  redis.call('XADD', stream, 'MAXLEN', '~', 10000, '*', 'type', kind, 'at', now,
    'balance', string.format('%d', balance), ...)
end

-- after_debit: a debit took the balance from `before` to `after`. The one debit that
-- takes a prepaid balance from paying for a call at `price` to not paying holds the
-- wallet (field 'hold' = since when, reason wallet_empty); the one that takes it from
-- the auto top-up threshold ('at_thr') or above to below appends topup_requested.
-- `wallet`, `saz`, `held` and `threshold` are the consumer hash's fields 'wallet',
-- 'saz', 'hold' and 'at_thr' (false when absent). Returns the notices appended.
local function after_debit(consumer, stream, now, before, after, price, wallet, saz, held, threshold)
  local notices = 0
  local function covers(b) return b > 0 and b >= price end
  if wallet == 'prepaid' and saz ~= '0' and not held and covers(before) and not covers(after) then
    redis.call('HSET', consumer, 'hold', now)
    notice(stream, 'suspended', now, after)
    notices = notices + 1
  end
  if threshold and before >= tonumber(threshold) and after < tonumber(threshold) then
    local t = redis.call('HMGET', consumer, 'at_amt', 'at_cur')
    notice(stream, 'topup_requested', now, after, 'threshold', threshold, 'amount', t[1], 'currency', t[2])
    notices = notices + 1
  end
  return notices
end

-- resumes: after a credit, a held wallet above zero is released. Returns 1 if it was.
local function after_credit(consumer, stream, now, balance)
  if balance > 0 and redis.call('HEXISTS', consumer, 'hold') == 1 then
    redis.call('HDEL', consumer, 'hold')
    redis.call('HSET', consumer, 'resumed', now)
    notice(stream, 'resumed', now, balance)
    return 1
  end
  return 0
end

