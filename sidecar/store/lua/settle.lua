-- settle.lua: bring a consumer's wallet in step with Postgres and trim what Postgres
-- now holds from the usage stream.
-- KEYS: 1 consumer hash  2 usage stream  3 wallet notices stream
-- ARGV: 1 Postgres balance (settled)  2 Postgres cumulative settled debits
--       3 Postgres wallet version  4 stream id: entries below it are trimmed ('' = none)
--       5 now ms
-- Returns {applied, balance}: applied 0 when Redis already has this version or a newer
-- one (the wallet is left alone; trimming still happens), -1 for an unknown consumer
-- (deleted: its stream is still trimmed, and removed once empty).
-- Guarantees: base and settled are replaced together, so base - spent + settled stays
-- exact whatever debits ran meanwhile (spent only grows here); versions only move
-- forward, so a slow sync never undoes a newer one. The first sync keeps the debits
-- Redis made before it (spent becomes settled + what was unsettled). A newer wallet
-- that brings a held wallet above zero (a credit made in Postgres) lifts the hold, as
-- topup.lua does.
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- A deleted consumer: what Postgres now holds still leaves the stream, and the
  -- stream itself once empty.
  if ARGV[4] ~= '' then
    redis.call('XTRIM', KEYS[2], 'MINID', ARGV[4])
    if redis.call('XLEN', KEYS[2]) == 0 then redis.call('DEL', KEYS[2]) end
  end
  return {-1, 0}
end
local w = redis.call('HMGET', KEYS[1], 'base', 'spent', 'settled', 'wver')
local base, spent, settled = tonumber(w[1]), tonumber(w[2]), tonumber(w[3])
local applied = 0
if not w[4] or tonumber(w[4]) < tonumber(ARGV[3]) then
  local pg_settled = tonumber(ARGV[2])
  if not w[4] then
    spent = pg_settled + (spent - settled)
    redis.call('HSET', KEYS[1], 'spent', string.format('%d', spent))
  end
  base, settled = tonumber(ARGV[1]), pg_settled
  redis.call('HSET', KEYS[1], 'base', ARGV[1], 'settled', ARGV[2], 'wver', ARGV[3])
  applied = 1
  after_credit(KEYS[1], KEYS[3], ARGV[5], base - spent + settled)
end
if ARGV[4] ~= '' then
  redis.call('XTRIM', KEYS[2], 'MINID', ARGV[4])
end
return {applied, base - spent + settled}
