-- consumer_delete.lua: remove a consumer from the hot store.
-- KEYS (all under the consumer's hash tag {tenant:consumer}, so one cluster slot):
--   1 consumer hash  2..6 the window counters of the current periods, minute..month
-- Returns {plan id, key hash...} of the consumer removed, or {} when there was none.
-- Guarantees: the next decision finds no consumer (unknown_consumer; invalid_key when
-- named by a key) and a consumer created again under the same id starts with empty
-- windows. The usage, event and notices streams are kept until the reconciler has drained
-- them; request records, top-up references and event markers expire on their own.
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return {} end
local out = {}
for i = 1, #fields, 2 do
  if fields[i] == 'plan' then
    table.insert(out, 1, fields[i + 1])
  elseif string.sub(fields[i], 1, 2) == 'k:' then
    table.insert(out, string.sub(fields[i], 3))
  end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
return out
