-- alerts.lua: the quota crossings of sidecar/core/alerts.py:quota_crossings, prepended
-- to the scripts that count calls (decide.lua, event.lua) when they are loaded; it
-- touches only the usage stream its caller passes (the caller's slot). Its caller's increment is atomic, so the one increment that takes a
-- window's count across a level is the only one to report it.

local WINDOW_NAMES = {'minute', 'hour', 'day', 'week', 'month'}
local QUOTA_LEVELS = {80, 90, 100}

-- ceil(limit * level / 100) without a product past 2^53 (doubles are exact below it).
local function level_count(limit, level)
  local whole = math.floor(limit / 100)
  local part = limit - whole * 100
  return level * whole + math.floor((level * part + 99) / 100)
end

-- crossings: `limits` and `used` (after the increment of `hits`) per window, -1 for a
-- window not counted; `resets` the reset ms of each window's period (strings).
-- Returns 'window:level:reset_ms:limit' items, comma separated ('' when none).
local function crossings(limits, used, hits, resets)
  local out = {}
  for i = 1, 5 do
    if limits[i] > 0 and used[i] >= 0 then
      for _, level in ipairs(QUOTA_LEVELS) do
        local edge = level_count(limits[i], level)
        if used[i] - hits < edge and edge <= used[i] then
          out[#out + 1] = WINDOW_NAMES[i] .. ':' .. level .. ':' .. resets[i] .. ':' ..
            string.format('%d', limits[i])
        end
      end
    end
  end
  return table.concat(out, ',')
end

-- add_usage: append one usage record (`entry`: field, value, ...) to `stream`, with the
-- crossings of its increment in field 'x' when there are any.
local function add_usage(stream, entry, limits, used, hits, resets)
  local x = crossings(limits, used, hits, resets)
  if x ~= '' then
    entry[#entry + 1] = 'x'
    entry[#entry + 1] = x
  end
  redis.call('XADD', stream, '*', unpack(entry))
end
