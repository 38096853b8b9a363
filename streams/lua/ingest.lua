--[[
liftstream ingest: apply one batch of one source partition to ONE experiment.

This is the Redis side of streams/semantics.py (the reference reducer); the
differential test proves the two equal bit for bit. Every rule, and every
ambiguity resolution, is documented there; the comments here say how.

Atomic (one script = one step for every other client), idempotent per source
offset: events with offset <= the stored offset of (topic, partition) are
skipped, so replaying a batch after a crash changes nothing.

KEYS (all tagged {e:<id>}, one Redis Cluster slot):
  1 units  2 pending  3 cells  4 arrivals  5 meta  6 seen  7 offsets  8 dirty_seq
ARGV:
  offsets-field "<topic>|<partition>", W, B, L, DD (ms), started_at_cfg ('' = none),
  n_edges, edges..., n_variants, variants..., n_metrics, metrics...,
  then ONE JSON array of events, each an array of 7 strings: offset, kind
  ('x' exposure | 'm' metric), event_id, unit_id, ts, variant|metric,
  pre_activity|value ('' = none). All strings, numbers included, so cjson
  never parses a number: tonumber does, exactly. (One JSON argument instead of
  7 per event: redis-py packs thousands of arguments slowly.)
Returns a flat [name, value, ...] list: applied, skipped, offset, max_ts,
dirty_seq and the count of every category that occurred.

Floats: never tostring()/concat on numbers (%.14g), never HINCRBYFLOAT (long
double). Numbers go to Redis as string.format('%.17g') (round-trips a double
exactly) and come back with tonumber; all arithmetic is Lua doubles, in the
same order as the Python reducer. Times and counts are integer-valued doubles
< 2^53, so they are exact too.

Unit state (hash field = unit id): "<variant_index> <stratum> <bucket>
<exposure_ts> <matured 0|1> <total_1> ... <total_M>" (variant index and
total order follow the config's variants / metrics, which are append-only).
]]

local K_UNITS, K_PENDING, K_CELLS, K_ARR = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_META, K_SEEN, K_OFF, K_DIRTY = KEYS[5], KEYS[6], KEYS[7], KEYS[8]

local function fmt(x) return string.format('%.17g', x) end

local CHUNK = 400  -- elements per variadic call (well under Lua's C stack)

-- ---------------------------------------------------------------- config
local p = 1
local function nextarg() local v = ARGV[p]; p = p + 1; return v end
local off_field = nextarg()
local W = tonumber(nextarg())
local B = tonumber(nextarg())
local L = tonumber(nextarg())
local DD = tonumber(nextarg())
local started_cfg = tonumber(nextarg())          -- '' -> nil
local n_edges = tonumber(nextarg())
local edges = {}
for k = 1, n_edges do edges[k] = tonumber(nextarg()) end
local S = n_edges - 1
if S < 0 then S = 0 end
local n_var = tonumber(nextarg())
local variants, var_index = {}, {}
for k = 1, n_var do local v = nextarg(); variants[k] = v; var_index[v] = k - 1 end
local n_met = tonumber(nextarg())
local metrics, met_index = {}, {}
for k = 1, n_met do local m = nextarg(); metrics[k] = m; met_index[m] = k end
local first_event = p

-- ---------------------------------------------------------------- state
local mraw = redis.call('HMGET', K_META, 'max_ts', 'started_at')
local max_ts = tonumber(mraw[1])
local started = tonumber(mraw[2])
local max_ts_dirty, started_dirty = false, false
local stored = tonumber(redis.call('HGET', K_OFF, off_field))

-- Integer floor division on integer-valued doubles, exact: a/b may round up
-- to the next integer, so correct the quotient by one if needed.
local function floordiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local function add(tbl, order, key, d)
  local v = tbl[key]
  if v == nil then order[#order + 1] = key; v = 0 end
  tbl[key] = v + d
end

local counts, count_order = {}, {}
local meta_incr, meta_incr_order = {}, {}
local arr_incr, arr_order = {}, {}

local units, units_dirty, units_order = {}, {}, {}
local function parse_unit(raw)
  if not raw then return false end
  local f = {}
  for tok in string.gmatch(raw, '%S+') do f[#f + 1] = tok end
  local u = {v = tonumber(f[1]), s = tonumber(f[2]), b = tonumber(f[3]),
             ets = tonumber(f[4]), m = tonumber(f[5]), t = {}}
  for k = 1, n_met do u.t[k] = tonumber(f[5 + k]) or 0.0 end
  return u
end
local function get_unit(uid)
  local u = units[uid]
  if u == nil then
    u = parse_unit(redis.call('HGET', K_UNITS, uid))
    units[uid] = u
  end
  return u
end
local function touch_unit(uid)
  if not units_dirty[uid] then units_dirty[uid] = true; units_order[#units_order + 1] = uid end
end

local cells, cells_order = {}, {}
local function get_cell(f)
  local c = cells[f]
  if c == nil then
    local raw = redis.call('HGET', K_CELLS, f)
    if raw then
      local a, b, d = string.match(raw, '^(%S+) (%S+) (%S+)$')
      c = {tonumber(a), tonumber(b), tonumber(d)}
    else
      c = {0, 0.0, 0.0}
    end
    cells[f] = c
    cells_order[#cells_order + 1] = f
  end
  return c
end

local act, act_order = {}, {}
local function get_act(f)
  local v = act[f]
  if v == nil then
    v = tonumber(redis.call('HGET', K_META, f)) or 0.0
    act_order[#act_order + 1] = f
  end
  return v
end

local seen, seen_dirty, seen_order = {}, {}, {}

-- Smallest pending close_ts (nil: none), kept locally so that the pending
-- set is only queried when something is actually due.
local next_due
local function refresh_next_due()
  local first = redis.call('ZRANGE', K_PENDING, 0, 0, 'WITHSCORES')
  next_due = tonumber(first[2])
end
refresh_next_due()

-- Fold every pending unit with close_ts <= wm, in ZSET order.
local function mature(wm)
  if next_due == nil or next_due > wm then return end
  local due = redis.call('ZRANGEBYSCORE', K_PENDING, '-inf', fmt(wm))
  for _, uid in ipairs(due) do
    local u = get_unit(uid)
    local vname = u and variants[u.v + 1]
    if u and u.m == 0 and vname == nil then
      -- the config lost this unit's variant (configs must only grow): do not
      -- fold into a cell that no longer exists, but do not stop ingest either
      u.m = 1
      touch_unit(uid)
    elseif u and u.m == 0 then
      local sfx = '|' .. vname .. '|' .. fmt(u.s)
      for k = 1, n_met do
        local y = u.t[k]
        local c = get_cell(metrics[k] .. sfx)
        c[1] = c[1] + 1
        c[2] = c[2] + y
        c[3] = c[3] + y * y
      end
      add(meta_incr, meta_incr_order, 'matured:' .. vname, 1)
      u.m = 1
      touch_unit(uid)
    end
  end
  for i = 1, #due, CHUNK do
    redis.call('ZREM', K_PENDING, unpack(due, i, math.min(i + CHUNK - 1, #due)))
  end
  refresh_next_due()
end

-- ---------------------------------------------------------------- events
local applied, skipped = 0, 0
local events = cjson.decode(ARGV[first_event])

-- Prefetch the dedupe sightings and unit states of the events to apply: one
-- ZMSCORE / HMGET per chunk instead of one call per event (Redis >= 6.2).
do
  local eids, uids, seen_e, seen_u = {}, {}, {}, {}
  local hi = stored
  for _, e in ipairs(events) do
    local off = tonumber(e[1])
    if hi == nil or off > hi then
      hi = off
      if not seen_e[e[3]] then seen_e[e[3]] = true; eids[#eids + 1] = e[3] end
      if not seen_u[e[4]] then seen_u[e[4]] = true; uids[#uids + 1] = e[4] end
    end
  end
  for i = 1, #eids, CHUNK do
    local j = math.min(i + CHUNK - 1, #eids)
    local sc = redis.call('ZMSCORE', K_SEEN, unpack(eids, i, j))
    for k = i, j do seen[eids[k]] = tonumber(sc[k - i + 1]) or false end
  end
  for i = 1, #uids, CHUNK do
    local j = math.min(i + CHUNK - 1, #uids)
    local raw = redis.call('HMGET', K_UNITS, unpack(uids, i, j))
    for k = i, j do units[uids[k]] = parse_unit(raw[k - i + 1]) end
  end
end
for _, e in ipairs(events) do
  local off = tonumber(e[1])
  if stored ~= nil and off <= stored then
    skipped = skipped + 1
  else
    stored = off
    applied = applied + 1
    local kind, eid, uid = e[2], e[3], e[4]
    local ts, a, b = tonumber(e[5]), e[6], e[7]
    local cat
    -- 1. dedupe (against max_ts before this event)
    local prev = seen[eid]
    if prev == nil then
      prev = tonumber(redis.call('ZSCORE', K_SEEN, eid)) or false
      seen[eid] = prev
    end
    if prev and max_ts ~= nil and prev >= max_ts - DD then
      cat = 'duplicate'
    else
      seen[eid] = ts
      if not seen_dirty[eid] then seen_dirty[eid] = true; seen_order[#seen_order + 1] = eid end
      -- 2. event time
      local check = false
      if max_ts == nil or ts > max_ts then max_ts = ts; max_ts_dirty = true; check = true end
      local wm = max_ts - L
      if kind == 'x' then
        -- 3. exposure
        local vi = var_index[a]
        if vi == nil then
          cat = 'unknown_variant'
        else
          local u = get_unit(uid)
          if u then
            if u.v == vi then cat = 'repeat_exposure' else cat = 'conflict' end
          else
            if started == nil then
              started = started_cfg or ts
              started_dirty = true
            end
            local x = tonumber(b)
            local st = S
            if x ~= nil and S > 0 then
              st = 0
              for k = S, 1, -1 do
                if x >= edges[k] then st = k - 1; break end
              end
            end
            local bucket = floordiv(ts - started, B)
            if bucket < 0 then bucket = 0 end
            u = {v = vi, s = st, b = bucket, ets = ts, m = 0, t = {}}
            for k = 1, n_met do u.t[k] = 0.0 end
            units[uid] = u
            touch_unit(uid)
            add(arr_incr, arr_order, fmt(st) .. '|' .. fmt(bucket), 1)
            if x ~= nil then
              local f = 'act_sum:' .. fmt(st)
              act[f] = get_act(f) + x
              add(meta_incr, meta_incr_order, 'act_n:' .. fmt(st), 1)
            end
            add(meta_incr, meta_incr_order, 'exposed:' .. a, 1)
            redis.call('ZADD', K_PENDING, fmt(ts + W), uid)
            if next_due == nil or ts + W < next_due then next_due = ts + W end
            if ts + W <= wm then check = true end
            cat = 'exposures'
          end
        end
      else
        -- 4. metric
        local u = get_unit(uid)
        local mi = met_index[a]
        if not u then cat = 'unknown_unit'
        elseif mi == nil then cat = 'unknown_metric'
        elseif ts < u.ets then cat = 'pre_exposure'
        elseif ts >= u.ets + W then cat = 'outside_window'
        elseif u.m == 1 then cat = 'late'
        else
          u.t[mi] = u.t[mi] + tonumber(b)
          touch_unit(uid)
          cat = 'metric_applied'
        end
      end
      -- 5. maturation (nothing new can be due unless the watermark moved or
      -- a unit was created with its window already closed)
      if check then mature(wm) end
    end
    add(counts, count_order, cat, 1)
  end
end

-- ---------------------------------------------------------------- write back
local seq = tonumber(redis.call('GET', K_DIRTY)) or 0
if applied > 0 then
  local buf = {}
  local function flush(cmd, key)
    if #buf > 0 then redis.call(cmd, key, unpack(buf)); buf = {} end
  end
  local function push2(cmd, key, x, y)
    buf[#buf + 1] = x; buf[#buf + 1] = y
    if #buf >= CHUNK then flush(cmd, key) end
  end
  for _, uid in ipairs(units_order) do
    local u = units[uid]
    local parts = {fmt(u.v), fmt(u.s), fmt(u.b), fmt(u.ets), fmt(u.m)}
    for k = 1, n_met do parts[5 + k] = fmt(u.t[k]) end
    push2('HSET', K_UNITS, uid, table.concat(parts, ' '))
  end
  flush('HSET', K_UNITS)
  for _, f in ipairs(cells_order) do
    local c = cells[f]
    push2('HSET', K_CELLS, f, fmt(c[1]) .. ' ' .. fmt(c[2]) .. ' ' .. fmt(c[3]))
  end
  flush('HSET', K_CELLS)
  for _, f in ipairs(arr_order) do redis.call('HINCRBY', K_ARR, f, fmt(arr_incr[f])) end
  for _, f in ipairs(meta_incr_order) do redis.call('HINCRBY', K_META, f, fmt(meta_incr[f])) end
  for _, name in ipairs(count_order) do redis.call('HINCRBY', K_META, 'c:' .. name, fmt(counts[name])) end
  for _, f in ipairs(act_order) do push2('HSET', K_META, f, fmt(act[f])) end
  if max_ts_dirty then push2('HSET', K_META, 'max_ts', fmt(max_ts)) end
  if started_dirty then push2('HSET', K_META, 'started_at', fmt(started)) end
  flush('HSET', K_META)
  for _, eid in ipairs(seen_order) do push2('ZADD', K_SEEN, fmt(seen[eid]), eid) end
  flush('ZADD', K_SEEN)
  -- Sightings below max_ts - DD can never mark a duplicate again (max_ts
  -- only grows), so dropping them cannot change any outcome.
  if max_ts ~= nil then
    redis.call('ZREMRANGEBYSCORE', K_SEEN, '-inf', '(' .. fmt(max_ts - DD))
  end
  redis.call('HSET', K_OFF, off_field, fmt(stored))
  seq = redis.call('INCR', K_DIRTY)
end

local out = {'applied', applied, 'skipped', skipped,
             'offset', stored and fmt(stored) or '',
             'max_ts', max_ts and fmt(max_ts) or '',
             'dirty_seq', seq}
for _, name in ipairs(count_order) do
  out[#out + 1] = name
  out[#out + 1] = counts[name]
end
return out
