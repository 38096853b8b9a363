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
  offsets-field "<topic>|<partition>", W, B, L, DD, I (ms), started_at_cfg ('' = none),
  n_edges, edges..., n_variants, variants..., n_metrics, metrics...,
  then TWO binary strings. The first holds a fixed-size head per event
  (lua struct / Python struct, little-endian, 31 bytes) '<c1HdddHH': kind
  ('x' exposure | 'm' metric), the 1-based index of its variant (exposure)
  or metric (metric) in the lists above, 0 when it is not one of them,
  offset, ts, pre_activity|value (doubles: exact; NaN = no pre_activity),
  and the byte lengths of event_id and unit_id. The second holds those two
  strings of every event, in order. One struct.unpack per event (numbers
  arrive as doubles, no tonumber; unpacking many heads per call is no
  faster: the table it fills costs what the calls save), instead of 7
  ARGV per event (redis-py packs thousands of arguments slowly), a JSON
  array (cjson builds a table per event) or text (pattern matching and
  tonumber cost 3x more).
Returns a flat [name, value, ...] list: applied, skipped, offset, max_ts,
watermark, dirty_seq and the count of every category that occurred.

Watermark (rule 2 of streams/semantics.py): meta keeps max_ts (over all
partitions), mx:<topic>|<partition> (this experiment's max event ts from that
source partition) and wm (the watermark, monotone). A batch comes from ONE
partition p, so the min of mx over the *other* partitions is fixed for the
batch (read once: the partitions are the fields of the offsets hash); per
event only mx:p and max_ts move, and the watermark is
max(wm, max(min(mx_p, min_other), max_ts - I) - L). State written before
wm existed has none: its watermark was max_ts - L, which is where it resumes.

Floats: never tostring()/concat on numbers (%.14g), never HINCRBYFLOAT (long
double). Numbers go to Redis as string.format('%.17g') (round-trips a double
exactly) or, for integer-valued ones (times, counts, indices: all < 2^53),
'%d', which writes the same digits; numbers passed to redis.call as numbers
are written by Redis itself with '%.17g'; they come back with tonumber; all
arithmetic is Lua doubles, in the same order as the Python reducer.

Unit state (hash field = unit id), binary (struct '<BHHBdd' + M x 'd'):
version 1, variant index, stratum, matured 0|1, entry bucket, exposure ts,
total_1 ... total_M (variant index and total order follow the config's
variants / metrics, which are append-only; a record with fewer totals than
metrics reads the missing ones as 0). Records in the earlier text form
"<variant_index> <stratum> <bucket> <exposure_ts> <matured 0|1> <total_1>
... <total_M>" (first byte a digit, never \1) are still read, and rewritten
in binary when next written. In this script a unit is the array the binary
record unpacks to, {1, variant, stratum, matured, bucket, exposure_ts,
total_1, ..., total_M} (fields U_V .. U_ETS, total k at U_ETS + k), so
reading one is one struct.unpack and writing one is one struct.pack.

Speed (DESIGN §5 keeps one call per experiment per batch; this keeps the work
per event small): every key is read at most once per batch (ZMSCORE / HMGET
prefetch in chunks) and written at most once per batch (HSET / ZADD in
chunks, counters aggregated locally). Maturation is lazy but exact: see
"Maturation" below.
]]

local K_UNITS, K_PENDING, K_CELLS, K_ARR = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_META, K_SEEN, K_OFF, K_DIRTY = KEYS[5], KEYS[6], KEYS[7], KEYS[8]

local call, tonumber, format, match, gmatch = redis.call, tonumber, string.format,
  string.match, string.gmatch
local unpack, floor, min, sub, byte = unpack, math.floor, math.min, string.sub, string.byte
local spack, sunpack = struct.pack, struct.unpack

local function fmt(x) return format('%.17g', x) end
local function fmti(x) return format('%d', x) end  -- integer-valued doubles < 2^53

local CHUNK = 400  -- elements per variadic call (well under Lua's C stack)

-- ---------------------------------------------------------------- config
local p = 1
local function nextarg() local v = ARGV[p]; p = p + 1; return v end
local off_field = nextarg()
local W = tonumber(nextarg())
local B = tonumber(nextarg())
local L = tonumber(nextarg())
local DD = tonumber(nextarg())
local I = tonumber(nextarg())
local started_cfg = tonumber(nextarg())          -- '' -> nil
local n_edges = tonumber(nextarg())
local edges = {}
for k = 1, n_edges do edges[k] = tonumber(nextarg()) end
local S = n_edges - 1
if S < 0 then S = 0 end
local n_var = tonumber(nextarg())
local variants = {}
for k = 1, n_var do variants[k] = nextarg() end
local n_met = tonumber(nextarg())
local metrics = {}
for k = 1, n_met do metrics[k] = nextarg() end
local heads = nextarg()
local strs = nextarg()

local UNIT_HEAD, UNIT_HEAD_LEN = '<BHHBdd', 22
local UNIT_FMT = UNIT_HEAD .. string.rep('d', n_met)
local unit_fmts = {[n_met] = UNIT_FMT}   -- by number of stored totals
local U_V, U_S, U_M, U_B, U_ETS = 2, 3, 4, 5, 6   -- unit array fields (totals follow)
local HEAD_FMT, HEAD_LEN = '<c1HdddHH', 31

-- ---------------------------------------------------------------- state
local MX_FIELD = 'mx:' .. off_field
local mraw = call('HMGET', K_META, 'max_ts', 'started_at', 'wm', MX_FIELD)
local max_ts = tonumber(mraw[1])
local started = tonumber(mraw[2])
local wm = tonumber(mraw[3])
if wm == nil and max_ts ~= nil then wm = max_ts - L end  -- state from before 'wm'
local mx_p = tonumber(mraw[4])
local max_ts_dirty, started_dirty, mx_p_dirty = false, false, false
-- min over the other source partitions of their max ts (nil: none seen)
local mx_other
do
  local parts = call('HKEYS', K_OFF)
  local fields = {}
  for _, f in ipairs(parts) do
    if f ~= off_field then fields[#fields + 1] = 'mx:' .. f end
  end
  for i = 1, #fields, CHUNK do
    local raw = call('HMGET', K_META, unpack(fields, i, min(i + CHUNK - 1, #fields)))
    for k = 1, #raw do
      local v = tonumber(raw[k])
      if v ~= nil and (mx_other == nil or v < mx_other) then mx_other = v end
    end
  end
end
local stored = tonumber(call('HGET', K_OFF, off_field))

-- Integer floor division on integer-valued doubles, exact: a/b may round up
-- to the next integer, so correct the quotient by one if needed.
local function floordiv(a, b)
  local q = floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end

local function chunked(cmd, key, list)
  for i = 1, #list, CHUNK do
    call(cmd, key, unpack(list, i, min(i + CHUNK - 1, #list)))
  end
end

-- ---------------------------------------------------------------- events
-- Pass 1: split the packed events into columns, skipping offsets already
-- applied, and collect the distinct event ids and unit ids to prefetch.
local E_OFF, E_KIND, E_EID, E_UID, E_TS, E_A, E_B = {}, {}, {}, {}, {}, {}, {}
local n, skipped = 0, 0
local eids, uids, want_e, want_u = {}, {}, {}, {}
do
  local hi = stored
  local n_ev = #heads / HEAD_LEN
  if n_ev ~= floor(n_ev) then return redis.error_reply('ERR event heads: bad length') end
  local spos = 1
  for hpos = 1, #heads, HEAD_LEN do
    local kind, ni, off, ts, b, la, lu = sunpack(HEAD_FMT, heads, hpos)
    local q = spos
    spos = q + la + lu
    if hi ~= nil and off <= hi then
      skipped = skipped + 1
    else
      hi = off
      n = n + 1
      if ni > (kind == 'x' and n_var or n_met) then
        return redis.error_reply('ERR event head: name index out of range')
      end
      local eid, uid = sub(strs, q, q + la - 1), sub(strs, q + la, spos - 1)
      if b ~= b then b = nil end  -- NaN: no pre_activity
      E_OFF[n], E_KIND[n], E_EID[n], E_UID[n], E_TS[n], E_A[n], E_B[n] =
        off, kind, eid, uid, ts, ni, b
      if not want_e[eid] then want_e[eid] = true; eids[#eids + 1] = eid end
      if not want_u[uid] then want_u[uid] = true; uids[#uids + 1] = uid end
    end
  end
  if spos ~= #strs + 1 then return redis.error_reply('ERR event strings: bad length') end
end

-- Dedupe sightings: seen[eid] = ts of the last counted sighting, false if none.
local seen = {}
for i = 1, #eids, CHUNK do
  local j = min(i + CHUNK - 1, #eids)
  local sc = call('ZMSCORE', K_SEEN, unpack(eids, i, j))
  for k = i, j do seen[eids[k]] = tonumber(sc[k - i + 1]) or false end
end
local seen_new, seen_order = {}, {}   -- new sightings, first-seen order

-- Units: units[uid] = table, false (no state), nil (not read yet).
local units, units_dirty, units_order = {}, {}, {}
local function parse_unit_text(raw)
  local v, s, b, e, m, rest = match(raw, '^(%S+) (%S+) (%S+) (%S+) (%S+)(.*)$')
  local u = {1, tonumber(v), tonumber(s), tonumber(m), tonumber(b), tonumber(e)}
  local k = 0
  if rest then
    for tok in gmatch(rest, '%S+') do
      if k >= n_met then break end
      k = k + 1
      u[U_ETS + k] = tonumber(tok) or 0.0
    end
  end
  for j = k + 1, n_met do u[U_ETS + j] = 0.0 end
  return u
end
local function parse_unit(raw)
  if not raw then return false end
  if byte(raw, 1) ~= 1 then return parse_unit_text(raw) end
  local nt = (#raw - UNIT_HEAD_LEN) / 8
  local f = unit_fmts[nt]
  if f == nil then f = UNIT_HEAD .. string.rep('d', nt); unit_fmts[nt] = f end
  local u = {sunpack(f, raw)}  -- then u[U_ETS + nt + 1] = the next position, never read
  for k = nt + 1, n_met do u[U_ETS + k] = 0.0 end
  return u
end
local function fetch_units(list)
  for i = 1, #list, CHUNK do
    local j = min(i + CHUNK - 1, #list)
    local raw = call('HMGET', K_UNITS, unpack(list, i, j))
    for k = i, j do units[list[k]] = parse_unit(raw[k - i + 1]) end
  end
end
fetch_units(uids)
local function touch_unit(uid)
  if not units_dirty[uid] then units_dirty[uid] = true; units_order[#units_order + 1] = uid end
end

-- Aggregated increments, written once at the end.
local counts, count_order = {}, {}
local exposed, matured = {}, {}          -- by variant index (0-based)
local act_n, act_sum = {}, {}            -- by stratum
local arr, arr_order = {}, {}            -- "stratum|bucket" -> new units

-- Cells: cell_of[v][s] = {cell_1, ..., cell_M}, each {n, sum_y, sum_y2},
-- read from Redis on first use.
local cells, cells_order, cell_rows = {}, {}, {}
local function row_of(v, s)
  local rv = cell_rows[v]
  if rv == nil then rv = {}; cell_rows[v] = rv end
  local row = rv[s]
  if row == nil then
    row = {}
    local sfx = '|' .. variants[v + 1] .. '|' .. fmti(s)
    local fields = {}
    for k = 1, n_met do fields[k] = metrics[k] .. sfx end
    local raw = call('HMGET', K_CELLS, unpack(fields))
    for k = 1, n_met do
      local c
      if raw[k] then
        local a, b, d = match(raw[k], '^(%S+) (%S+) (%S+)$')
        c = {tonumber(a), tonumber(b), tonumber(d)}
      else
        c = {0, 0.0, 0.0}
      end
      row[k] = c
      cells[fields[k]] = c
      cells_order[#cells_order + 1] = fields[k]
    end
    rv[s] = row
  end
  return row
end

-- Maturation. The reducer folds, after every non-duplicate event, every
-- pending unit with close_ts <= watermark, in (close_ts, unit_id) order
-- (ZSET order). Units it folds at different events have disjoint, increasing
-- close_ts ranges (each event folds (previous watermark, watermark]), so the
-- whole batch's folds are one pass in ZSET order at the end (settle). The
-- exception is a unit *created* with its window already closed (a very late
-- exposure, common when one source partition runs ahead of another), which
-- the reducer folds at once, after everything due at the previous watermark:
-- such a unit is not added to the pending set but noted as a marker
-- (previous watermark, unit), and settle folds it in the walk over the due
-- units right after those with close_ts <= that watermark. (If the same
-- event also moved the watermark -- only possible with W = L = 0 -- the unit
-- goes through the pending set and settle runs before and after it.)
-- Until a unit is folded, "is it matured" is answered as the reducer would:
-- close_ts <= watermark. New pending units are buffered and ZADDed by settle.
local pend_new = {}            -- ZADD arguments: close, uid, close, uid, ...
local marks_t, marks_u = {}, {}  -- late-created units: previous watermark, unit
local next_due                 -- smallest close_ts in the pending set (nil: none)
local function refresh_next_due()
  local first = call('ZRANGE', K_PENDING, 0, 0, 'WITHSCORES')
  next_due = tonumber(first[2])
end
refresh_next_due()

local function fold(uid)
  local u = units[uid]
  if u and u[U_M] == 0 then
    if variants[u[U_V] + 1] == nil then
      -- the config lost this unit's variant (configs must only grow): do not
      -- fold into a cell that no longer exists, but do not stop ingest either
      u[U_M] = 1
      touch_unit(uid)
    else
      local row = row_of(u[U_V], u[U_S])
      for k = 1, n_met do
        local y = u[U_ETS + k]
        local c = row[k]
        c[1] = c[1] + 1
        c[2] = c[2] + y
        c[3] = c[3] + y * y
      end
      matured[u[U_V]] = (matured[u[U_V]] or 0) + 1
      u[U_M] = 1
      touch_unit(uid)
    end
  end
end

-- Fold, in the reducer's order, every pending unit with close_ts <= wm and
-- every marker (all markers have a threshold <= wm).
local function settle(wm)
  if wm == nil then return end
  if #pend_new > 0 then chunked('ZADD', K_PENDING, pend_new); pend_new = {} end
  local due, step = {}, 1
  if next_due ~= nil and next_due <= wm then
    if #marks_u > 0 then
      due = call('ZRANGEBYSCORE', K_PENDING, '-inf', fmti(wm), 'WITHSCORES')
      step = 2
    else
      due = call('ZRANGEBYSCORE', K_PENDING, '-inf', fmti(wm))
    end
  end
  local miss = {}
  for j = 1, #due, step do
    if units[due[j]] == nil then miss[#miss + 1] = due[j] end
  end
  fetch_units(miss)
  local j = 1
  for k = 1, #marks_u do
    local t = marks_t[k]
    while j <= #due and tonumber(due[j + 1]) <= t do fold(due[j]); j = j + 2 end
    fold(marks_u[k])
  end
  marks_t, marks_u = {}, {}
  while j <= #due do fold(due[j]); j = j + step end
  if #due > 0 then
    if step == 2 then
      local uids_due = {}
      for q = 1, #due, 2 do uids_due[#uids_due + 1] = due[q] end
      due = uids_due
    end
    chunked('ZREM', K_PENDING, due)
    refresh_next_due()
  end
end

-- Pass 2: the rules, event by event.
local any_counted = false      -- a non-duplicate event: the reducer matures after it
for i = 1, n do
  local eid = E_EID[i]
  local ts = E_TS[i]
  local cat
  -- 1. dedupe (against max_ts before this event)
  local prev = seen[eid]
  if prev and max_ts ~= nil and prev >= max_ts - DD then
    cat = 'duplicate'
  else
    any_counted = true
    if not seen_new[eid] then seen_new[eid] = true; seen_order[#seen_order + 1] = eid end
    seen[eid] = ts
    -- 2. event time
    local wm_before = wm
    if max_ts == nil or ts > max_ts then max_ts = ts; max_ts_dirty = true end
    if mx_p == nil or ts > mx_p then
      mx_p = ts; mx_p_dirty = true
      local lo = ts
      if mx_other ~= nil and mx_other < lo then lo = mx_other end
      if max_ts - I > lo then lo = max_ts - I end
      lo = lo - L
      if wm == nil or lo > wm then wm = lo end
    end
    local uid = E_UID[i]
    if E_KIND[i] == 'x' then
      -- 3. exposure
      local vi = E_A[i] - 1
      if vi < 0 then
        cat = 'unknown_variant'
      else
        local u = units[uid]
        if u then
          if u[U_V] == vi then cat = 'repeat_exposure' else cat = 'conflict' end
        else
          if started == nil then
            started = started_cfg or ts
            started_dirty = true
          end
          local x = E_B[i]
          local st = S
          if x ~= nil and S > 0 then
            st = 0
            for k = S, 1, -1 do
              if x >= edges[k] then st = k - 1; break end
            end
          end
          local bucket = floordiv(ts - started, B)
          if bucket < 0 then bucket = 0 end
          local close = ts + W
          local late = close <= wm
          local marker = late and wm == wm_before
          if late and not marker then settle(wm_before) end
          u = {1, vi, st, 0, bucket, ts}
          for k = 1, n_met do u[U_ETS + k] = 0.0 end
          units[uid] = u
          touch_unit(uid)
          local ak = format('%d|%d', st, bucket)
          local c = arr[ak]
          if c == nil then arr_order[#arr_order + 1] = ak; c = 0 end
          arr[ak] = c + 1
          if x ~= nil then
            local sum = act_sum[st]
            if sum == nil then
              sum = tonumber(call('HGET', K_META, 'act_sum:' .. fmti(st))) or 0.0
            end
            act_sum[st] = sum + x
            act_n[st] = (act_n[st] or 0) + 1
          end
          exposed[vi] = (exposed[vi] or 0) + 1
          if marker then
            marks_t[#marks_t + 1] = wm_before
            marks_u[#marks_u + 1] = uid
          else
            pend_new[#pend_new + 1] = close
            pend_new[#pend_new + 1] = uid
            if next_due == nil or close < next_due then next_due = close end
            if late then settle(wm) end
          end
          cat = 'exposures'
        end
      end
    else
      -- 4. metric
      local u = units[uid]
      local mi = E_A[i]
      if not u then cat = 'unknown_unit'
      elseif mi == 0 then cat = 'unknown_metric'
      elseif ts < u[U_ETS] then cat = 'pre_exposure'
      elseif ts >= u[U_ETS] + W then cat = 'outside_window'
      elseif u[U_M] == 1 or u[U_ETS] + W <= wm then cat = 'late'  -- matured (maybe not folded yet)
      else
        local c = U_ETS + mi
        u[c] = u[c] + E_B[i]
        touch_unit(uid)
        cat = 'metric_applied'
      end
    end
  end
  local c = counts[cat]
  if c == nil then count_order[#count_order + 1] = cat; c = 0 end
  counts[cat] = c + 1
end
-- 5. maturation for the whole batch, in ZSET order
if any_counted then settle(wm) end

-- ---------------------------------------------------------------- write back
local seq = tonumber(call('GET', K_DIRTY)) or 0
if n > 0 then
  if #pend_new > 0 then chunked('ZADD', K_PENDING, pend_new) end
  local buf, nb = {}, 0
  local function flush(cmd, key)
    if nb > 0 then call(cmd, key, unpack(buf, 1, nb)); nb = 0 end
  end
  local function push2(cmd, key, x, y)
    buf[nb + 1] = x; buf[nb + 2] = y; nb = nb + 2
    if nb >= CHUNK then flush(cmd, key) end
  end
  for _, uid in ipairs(units_order) do
    local u = units[uid]
    push2('HSET', K_UNITS, uid, spack(UNIT_FMT, unpack(u, 1, U_ETS + n_met)))
  end
  flush('HSET', K_UNITS)
  for _, f in ipairs(cells_order) do
    local c = cells[f]
    push2('HSET', K_CELLS, f, fmti(c[1]) .. ' ' .. fmt(c[2]) .. ' ' .. fmt(c[3]))
  end
  flush('HSET', K_CELLS)
  for _, f in ipairs(arr_order) do call('HINCRBY', K_ARR, f, arr[f]) end
  for v = 0, n_var - 1 do
    if exposed[v] then call('HINCRBY', K_META, 'exposed:' .. variants[v + 1], exposed[v]) end
    if matured[v] then call('HINCRBY', K_META, 'matured:' .. variants[v + 1], matured[v]) end
  end
  for st = 0, S do
    if act_n[st] then
      call('HINCRBY', K_META, 'act_n:' .. fmti(st), act_n[st])
      push2('HSET', K_META, 'act_sum:' .. fmti(st), fmt(act_sum[st]))
    end
  end
  for _, name in ipairs(count_order) do call('HINCRBY', K_META, 'c:' .. name, counts[name]) end
  if max_ts_dirty then push2('HSET', K_META, 'max_ts', fmti(max_ts)) end
  if mx_p_dirty then push2('HSET', K_META, MX_FIELD, fmti(mx_p)) end
  if wm ~= nil then push2('HSET', K_META, 'wm', fmti(wm)) end
  if started_dirty then push2('HSET', K_META, 'started_at', fmti(started)) end
  flush('HSET', K_META)
  for _, eid in ipairs(seen_order) do push2('ZADD', K_SEEN, seen[eid], eid) end
  flush('ZADD', K_SEEN)
  -- Sightings below max_ts - DD can never mark a duplicate again (max_ts
  -- only grows), so dropping them cannot change any outcome.
  if max_ts ~= nil then
    call('ZREMRANGEBYSCORE', K_SEEN, '-inf', '(' .. fmti(max_ts - DD))
  end
  call('HSET', K_OFF, off_field, fmti(E_OFF[n]))
  seq = call('INCR', K_DIRTY)
end

local out = {'applied', n, 'skipped', skipped,
             'offset', stored and fmt(stored) or '',
             'max_ts', max_ts and fmt(max_ts) or '',
             'watermark', wm and fmt(wm) or '',
             'dirty_seq', seq}
if n > 0 then out[6] = fmti(E_OFF[n]) end
for _, name in ipairs(count_order) do
  out[#out + 1] = name
  out[#out + 1] = counts[name]
end
return out
