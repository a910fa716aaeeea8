-- event.lua: append one gateway usage event, at most once per request id.
-- KEYS: 1 dedupe marker {tenant:consumer}:e:<request id>  2 event stream {tenant:consumer}:g
-- ARGV: 1 dedupe ttl ms  2 the event, JSON-encoded
-- Returns 1 if appended, 0 if the request id was already recorded (nothing changed).
-- Guarantees: the marker and the stream entry are written together or not at all, so a
-- resent event (a gateway retry, a replayed batch) is stored exactly once.
if redis.call('SET', KEYS[1], 1, 'NX', 'PX', ARGV[1]) then
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
  return 1
end
return 0
