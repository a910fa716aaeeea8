-- event.lua: append one gateway usage event, at most once per request id, and rate it:
-- count it in the consumer's windows and charge it at the plan's price, like a
-- decision, unless a decision of this sidecar already did (sidecar/core/wallet_rules.py:
-- rate_event, after_debit; the memory store runs the same rules).
-- KEYS (all under the hash tag {tenant:consumer}, so one cluster slot):
--   1 dedupe marker :e:<request id>  2 event stream :g  3 consumer hash :c
--   4 usage stream :u  5 wallet notices stream :n  6 decision record :r:<request id>
--   7..11 window counters (minute..month) of the periods holding the event's time
-- ARGV: 1 dedupe ttl ms  2 the event, JSON-encoded  3 request id  4 event time ms
--       5 tenant  6 consumer id  7 product  8 operation  9 count (requests it stands for)
--       10 decision id the gateway reported ('' = none)  11..15 reset ms of the periods
--       of KEYS 7..11  16 now ms  17 '1' to rate, '0' to store only
-- Returns {stored, rated, notices}: stored 0 when the request id was already recorded
-- (nothing changed); rated 1 when it was counted and charged (one usage record appended
-- with decision id 'ev:<request id>', and in field 'x' the quota levels its count took a
-- window across, as decide.lua does); notices: wallet notices appended.
-- Guarantees: marker, event, counts, debit, usage record and notices are written
-- together or not at all, so a resent event is stored and charged exactly once. Not
-- rated: an event a decision covered (a decision id given, or this request id's
-- decision on record), of an unknown consumer, of no requests, or whose cost would pass
-- 2^53-1 micros. Only windows whose period is still running are counted (an ended
-- period's counter is gone); a quota never refuses an event: the call happened.
if not redis.call('SET', KEYS[1], 1, 'NX', 'PX', ARGV[1]) then
  return {0, 0, 0}
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
if ARGV[17] ~= '1' or ARGV[10] ~= '' or redis.call('EXISTS', KEYS[6]) == 1 then
  return {1, 0, 0}
end
local c = redis.call('HMGET', KEYS[3], 'price', 'wallet', 'base', 'spent', 'settled',
  'l_minute', 'l_hour', 'l_day', 'l_week', 'l_month', 'hold', 'saz', 'at_thr')
if not c[1] then
  return {1, 0, 0}
end
local count, price = tonumber(ARGV[9]), tonumber(c[1])
local cost = count * price
if count <= 0 or cost > 9007199254740991 then
  return {1, 0, 0}
end
local now = tonumber(ARGV[16])
local limits, used, resets = {-1, -1, -1, -1, -1}, {-1, -1, -1, -1, -1}, {}
for i = 1, 5 do
  local reset = tonumber(ARGV[10 + i])
  resets[i] = ARGV[10 + i]
  if c[5 + i] and reset > now then
    limits[i] = tonumber(c[5 + i])
    used[i] = redis.call('INCRBY', KEYS[6 + i], ARGV[9])
    if used[i] == count then
      redis.call('PEXPIREAT', KEYS[6 + i], reset + 600000)
    end
  end
end
local cost_text = string.format('%d', cost)
local unsettled_base = tonumber(c[3]) + tonumber(c[5])
local before = unsettled_base - tonumber(c[4])
local balance = unsettled_base - redis.call('HINCRBY', KEYS[3], 'spent', cost_text)
-- With the quota levels the event's count took a window across (alerts.lua).
add_usage(KEYS[4], {'rid', ARGV[3], 'did', 'ev:' .. ARGV[3], 'ts', ARGV[4], 't', ARGV[5],
  'c', ARGV[6], 'p', ARGV[7], 'op', ARGV[8], 'cost', cost_text, 'hits', ARGV[9]}, limits, used, count, resets)

local notices = after_debit(KEYS[3], KEYS[5], ARGV[16], before, balance, price, c[2], c[12], c[11], c[13])
return {1, 1, notices}
