--[[
liftstream ingest: one call applies one batch of ONE source partition to ONE
experiment, then matures and expires holds on that partition.

This is the Redis side of streams/state/semantics.py (the reference reducer:
ExperimentState.apply_batch); the differential tests prove the two equal bit
for bit on the same calls. Every rule and every ambiguity resolution is
documented there; the comments here say how.

Atomic (one script = one step for every other client), idempotent per source
offset: events with offset <= the stored offset of (topic, partition) are
skipped, so replaying a batch after a crash changes nothing. A call with no
events only settles (matures, expires holds) at the given clock: folding is a
function of the clock, so repeating it changes nothing either.

KEYS (all tagged {e:<id>}, one Redis Cluster slot):
  1 units  2 pending:<src>  3 cells  4 arrivals  5 meta  6 seen:<src>  7 offsets
  8 dirty_seq  9 held  10 heldq:<src>  11 retired (the retired-unit filter's
  bitmap, streams/state/retired_filter.py; layers, bits and hashes as there)
ARGV:
  src "<topic>|<partition>", epoch (the caller's owner epoch of src, '' = not
  fenced: tests and tools), W, B, L, DD, H, Hh (ms), HM, fold_limit,
  started_at_cfg ('' = none), end_at ('' = none), clk_end, n_edges, edges..., n_variants,
  variants..., n_metrics, metrics..., n_age_edges (0 = exposure age not
  tracked), age edges... (ms since exposure, streams.state.semantics.age_edges_ms),
  n_fine_edges, fine edges... (fine_edges; only when n_age_edges > 0), then
  THREE binary strings. The first
  holds a fixed-size head per event (struct, little-endian, 39 bytes)
  '<c1HddddHH': kind ('x' exposure | 'm' metric | 'h' a metric held without
  experiment_id, released by the exposure just before it, whose offset it
  shares), the 1-based index of its variant (exposure) or metric (metric) in
  the lists above, 0 when it is not one of them, offset, ts,
  pre_activity|value (NaN = no pre_activity), the partition clock after the
  event, and the byte lengths of event_id and unit_id. The second holds
  those two strings of every event, in order. The third holds the exposures'
  pre-experiment values (CUPED covariates): n_metrics little-endian doubles
  per 'x' head, in order (skipped ones included), value k for metric k (NaN
  = none); or is empty (or absent) when no exposure of the batch has any.
  Then (optional) n_dead, and n_dead pairs offset, meta field: the batch's
  dead letters attributed to this experiment (issue 24, defect 5), the field
  dl:<reason>, or c:<counter> for one that stands for a counter (c:after_end:
  an exposure to a concluded experiment). Each one whose offset is above the
  stored offset adds 1 to its meta field, and the
  stored offset becomes the largest offset applied, event or dead letter: a
  replay of the batch counts none again. A call with dead letters and no
  events does not settle.
Fencing: meta field own:<src> keeps the newest epoch that wrote here; a call
with an older one is refused (error FENCED) before it reads anything.
Returns a flat [name, value, ...] list: applied, skipped, offset, max_ts,
more (1: more than fold_limit units were due; call again), dirty_seq and
the net change of every counter that moved.

Floats: never tostring()/concat on numbers (%.14g), never HINCRBYFLOAT (long
double). Numbers go to Redis as '%.17g' (round-trips a double) or '%d' for
integer-valued ones (< 2^53); all arithmetic is Lua doubles, in the same
order as the Python reducer.

Unit state (hash field = unit id), binary. Version 1, a unit without
pre-experiment values (struct '<BHHBdd' + M x 'd'): 1, variant index,
stratum, matured (folded) 0|1, entry bucket (on the anchor grid), exposure
ts, total_1 ... total_M. Version 2, a unit created with a pre value of at
least one metric (struct '<BHHBddH' + 2m x 'd'): 2, the same five fields,
m (n_metrics when written), total_1 ... total_m, pre_1 ... pre_m (NaN =
none). Indices follow the config's variants / metrics, which are
append-only; a record with fewer totals reads the missing ones as 0 and the
missing pre values as none. In this script a unit is the array
{version, variant, stratum, matured, bucket, exposure_ts, total_1, ...,
total_M} (fields U_V .. U_ETS, total k at U_ETS + k); a unit with pre values
has version 2 and pre_1 ... pre_M (NaN = none) after its totals (pre k at
U_PRE + k), fixed at its creation.
Version 3, a unit of a config with exposure-age tracking (issue 19; struct
'<BHHBdd' + (m + p + m*nb) x 'd' + 'HHBH'): 3, the same five fields,
total_1 ... total_m, pre_1 ... pre_p, the bin totals of metric 1 (nb of
them), of metric 2, ..., then a 7-byte trailer: m, p (0: no pre values,
else m), nb (age bins), fine stratum. The trailer comes last so that the
usual record (m = n_metrics) unpacks in one call straight into the unit
array: in this script such a unit has u[1] = 3 (no pre values) or 4 (pre
values), its bins from U_PRE + p + 1 (age_base), then m, p, nb and its fine
stratum. A unit of version 1/2 (written before tracking) keeps its version
and enters no age cell.
Held metrics (hash field = unit id): records '<Hdd' (metric index, ts,
value) in arrival order; heldq:<src> scores each unit by its newest held ts.

meta: max_ts, anchor (the entry-bucket grid's origin: the configured start
at the first unit creation, else 0 = the epoch; state from before has
started_at, which is read as the anchor), clk:<src> (the last clock a call
brought), exposed:<v>, matured:<v>, act_sum:<s>, act_n:<s>, c:<counter>.
]]

local K_UNITS, K_PENDING, K_CELLS, K_ARR = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_META, K_SEEN, K_OFF, K_DIRTY = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_HELD, K_HELDQ, K_RET = KEYS[9], KEYS[10], KEYS[11]

local call, tonumber, format, match = redis.call, tonumber, string.format, string.match
local unpack, floor, min, sub, byte = unpack, math.floor, math.min, string.sub, string.byte
local spack, sunpack = struct.pack, struct.unpack

local function fmt(x) return format('%.17g', x) end
local function fmti(x) return format('%d', x) end  -- integer-valued doubles < 2^53

local CHUNK = 400  -- elements per variadic call (well under Lua's C stack)

-- ---------------------------------------------------------------- config
local p = 1
local function nextarg() local v = ARGV[p]; p = p + 1; return v end
local src = nextarg()
local epoch = tonumber(nextarg())                -- '' -> nil
local W = tonumber(nextarg())
local B = tonumber(nextarg())
local L = tonumber(nextarg())
local DD = tonumber(nextarg())
local H = tonumber(nextarg())
local Hh = tonumber(nextarg())
local HM = tonumber(nextarg())
local FOLD_LIMIT = tonumber(nextarg())
local started_cfg = tonumber(nextarg())          -- '' -> nil
local end_at = tonumber(nextarg())               -- '' -> nil: exposures from it on: after_end
local clk_end = tonumber(nextarg())
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
local n_age = tonumber(nextarg())                -- exposure-age edges (issue 19)
local age_edges = {}
for k = 1, n_age do age_edges[k] = tonumber(nextarg()) end
local NB = n_age - 1                             -- age bins; < 2: not tracked
local AGE = NB >= 2
local fine_edges, NF = {}, 0
if n_age > 0 then
  local n_fe = tonumber(nextarg())
  for k = 1, n_fe do fine_edges[k] = tonumber(nextarg()) end
  NF = n_fe - 1                                  -- fine strata (NF: unknown activity)
  if NF < 0 then NF = 0 end
end
local heads = nextarg()
local strs = nextarg()
local pres = nextarg() or ''
local has_pres = pres ~= ''
-- DL: n (dead letters passed), by (meta field -> new ones), order, hi (largest new offset)
local DL = {n = tonumber(nextarg() or '0') or 0, by = {}, order = {}}

local UNIT_HEAD, UNIT_HEAD_LEN = '<BHHBdd', 22
local UNIT_FMT = UNIT_HEAD .. string.rep('d', n_met)
local unit_fmts = {[n_met] = UNIT_FMT}   -- by number of stored totals
local UNIT2_HEAD, UNIT2_HEAD_LEN = '<BHHBddH', 24
local unit2_fmts = {}                    -- by number of stored metrics
local function unit2_fmt(m)
  local f = unit2_fmts[m]
  if f == nil then f = UNIT2_HEAD .. string.rep('d', 2 * m); unit2_fmts[m] = f end
  return f
end
local PRE_LEN = 8 * n_met                -- bytes of one exposure's pre values
local UNIT3_TAIL, UNIT3_TAIL_LEN = '<HHBH', 7   -- exposure-age units (issue 19): m p nb fine
local unit3_fmts = {}                    -- by (m, p, nb)
local function unit3_fmt(m, np, nb)
  local key = m .. ' ' .. np .. ' ' .. nb
  local f = unit3_fmts[key]
  if f == nil then
    f = UNIT_HEAD .. string.rep('d', m + np + m * nb) .. 'HHBH'
    unit3_fmts[key] = f
  end
  return f
end
local AC_X = 2 * NB + 2                  -- an age cell: {n, Σy_0, Σy_0², ..., Σy_0·y_{NB-1}}
local A_LEN = n_met * NB                 -- bins of a unit
local U_V, U_S, U_M, U_B, U_ETS = 2, 3, 4, 5, 6   -- unit array fields (totals follow)
local U_PRE = U_ETS + n_met                        -- pre values of a version-2 unit
-- first bin index - 1 of an age-tracked unit (u[1] 3: no pre values, 4: pre values)
local function age_base(u) if u[1] == 4 then return U_PRE + n_met end return U_PRE end
local HEAD_FMT, HEAD_LEN = '<c1HddddHH', 39
local HELD_FMT, HELD_LEN = '<Hdd', 18

-- ---------------------------------------------------------------- state
-- Writes: none before every call that can fail has run (issue 24, defect 7:
-- Lua writes are not rolled back). The checks below answer errors before
-- the first write; the one command that could fail later, BITFIELD SET past
-- the string's limit, is kept in range by the retired filter's cap.
local CLK_FIELD = 'clk:' .. src
local own_write = nil           -- the own:<src> field, when the epoch is written (at the end)
if epoch ~= nil then
  local own_field = 'own:' .. src
  local owner = tonumber(call('HGET', K_META, own_field))
  if owner ~= nil and epoch < owner then
    return redis.error_reply('FENCED ' .. src .. ' is owned by epoch ' .. fmti(owner))
  end
  if owner ~= epoch then own_write = own_field end
end
local mraw = call('HMGET', K_META, 'max_ts', 'anchor', 'started_at', CLK_FIELD, 'retired_n',
                  'retired_cap')
local max_ts = tonumber(mraw[1])
local anchor = tonumber(mraw[2]) or tonumber(mraw[3])
local clk_prev = tonumber(mraw[4])
local retired_n = tonumber(mraw[5]) or 0
local retired_n0 = retired_n
local max_ts_dirty, anchor_dirty = false, false
local stored = tonumber(call('HGET', K_OFF, src))

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
-- Dead letters: counted once, under the same offset skip as the events.
for _ = 1, DL.n do
  local off, f = tonumber(nextarg()), nextarg()
  if off == nil or f == nil or not (f:sub(1, 3) == 'dl:' or f:sub(1, 2) == 'c:') then
    return redis.error_reply('ERR dead letters: bad args')
  end
  if stored == nil or off > stored then
    if DL.by[f] == nil then DL.by[f] = 0; DL.order[#DL.order + 1] = f end
    DL.by[f] = DL.by[f] + 1
    if DL.hi == nil or off > DL.hi then DL.hi = off end
  end
end

-- Pass 1: split the packed events into columns, skipping offsets already
-- applied, and collect the distinct event ids and unit ids to prefetch.
local E_OFF, E_KIND, E_EID, E_UID, E_TS, E_A, E_B, E_CLK = {}, {}, {}, {}, {}, {}, {}, {}
local E_PRE = {}   -- exposure -> position of its pre values in pres (only when pres ~= '')
local n, skipped = 0, 0
local eids, uids, want_e, want_u = {}, {}, {}, {}
do
  local hi = stored
  local last_skipped = false
  local n_ev = #heads / HEAD_LEN
  if n_ev ~= floor(n_ev) then return redis.error_reply('ERR event heads: bad length') end
  local spos = 1
  local ppos = 1   -- the next exposure's pre values in pres
  for hpos = 1, #heads, HEAD_LEN do
    local kind, ni, off, ts, b, clk, la, lu = sunpack(HEAD_FMT, heads, hpos)
    local q = spos
    spos = q + la + lu
    local xp = ppos
    if has_pres and kind == 'x' then ppos = ppos + PRE_LEN end
    local skip
    if kind == 'h' then skip = last_skipped
    else skip = hi ~= nil and off <= hi; last_skipped = skip end
    if skip then
      skipped = skipped + 1
    else
      if kind ~= 'h' then hi = off end
      n = n + 1
      if ni > (kind == 'x' and n_var or n_met) then
        return redis.error_reply('ERR event head: name index out of range')
      end
      if clk > clk_end then return redis.error_reply('ERR event head: clock beyond clk_end') end
      local eid, uid = sub(strs, q, q + la - 1), sub(strs, q + la, spos - 1)
      if b ~= b then b = nil end  -- NaN: no pre_activity
      E_OFF[n], E_KIND[n], E_EID[n], E_UID[n], E_TS[n], E_A[n], E_B[n], E_CLK[n] =
        off, kind, eid, uid, ts, ni, b, clk
      if has_pres and kind == 'x' then E_PRE[n] = xp end
      if not want_e[eid] then want_e[eid] = true; eids[#eids + 1] = eid end
      if not want_u[uid] then want_u[uid] = true; uids[#uids + 1] = uid end
    end
  end
  if spos ~= #strs + 1 then return redis.error_reply('ERR event strings: bad length') end
  if has_pres and ppos ~= #pres + 1 then
    return redis.error_reply('ERR event pre values: bad length')
  end
end
local PRE_FMT = '<' .. string.rep('d', n_met)

-- A new unit u takes the pre values of the exposure at position pos of
-- pres: version 2 if it has one of any metric, else it stays version 1.
local function take_pre(u, pos)
  local x = {sunpack(PRE_FMT, pres, pos)}
  for k = 1, n_met do
    local v = x[k]
    if v == v then
      u[1] = 2
      for j = 1, n_met do u[U_PRE + j] = x[j] end
      return
    end
  end
end

-- Dedupe sightings: seen[eid] = the partition clock at the last counted
-- sighting (rule 1: not the event's ts), false if none.
local seen = {}
for i = 1, #eids, CHUNK do
  local j = min(i + CHUNK - 1, #eids)
  local sc = call('ZMSCORE', K_SEEN, unpack(eids, i, j))
  for k = i, j do seen[eids[k]] = tonumber(sc[k - i + 1]) or false end
end
local seen_new, seen_order = {}, {}   -- new sightings, first-seen order

-- Units: units[uid] = array, false (no state), nil (not read yet).
local units, units_dirty, units_order = {}, {}, {}
-- Records in the earliest text form "<variant_index> <stratum> <bucket>
-- <exposure_ts> <matured 0|1> <total_1> ... <total_M>" (first byte a digit,
-- never \1) are still read, and rewritten in binary when next written.
local function parse_unit_text(raw)
  local v, s, b, e, m, rest = match(raw, '^(%S+) (%S+) (%S+) (%S+) (%S+)(.*)$')
  local u = {1, tonumber(v), tonumber(s), tonumber(m), tonumber(b), tonumber(e)}
  local k = 0
  if rest then
    for tok in string.gmatch(rest, '%S+') do
      if k >= n_met then break end
      k = k + 1
      u[U_ETS + k] = tonumber(tok) or 0.0
    end
  end
  for j = k + 1, n_met do u[U_ETS + j] = 0.0 end
  return u
end
local NAN = 0 / 0
local tremove = table.remove
local function parse_unit2(raw)
  local m = sunpack('<H', raw, 23)
  local u = {sunpack(unit2_fmt(m), raw)}  -- {2, v, s, mat, b, ets, m, totals, pres, next}
  tremove(u, U_ETS + 1)                   -- m: totals from U_ETS + 1, pres from U_ETS + m + 1
  if m ~= n_met then                      -- metrics appended since (or a record from a
    local pre = {}                        -- longer config): pad or cut both
    for k = 1, n_met do pre[k] = k <= m and u[U_ETS + m + k] or NAN end
    for k = m + 1, n_met do u[U_ETS + k] = 0.0 end
    for k = 1, n_met do u[U_PRE + k] = pre[k] end
  end
  u[U_PRE + n_met + 1] = nil              -- the next position (m == n_met), or a leftover
  for k = U_PRE + n_met + 2, U_ETS + 2 * m + 1 do u[k] = nil end
  return u
end
-- Version 3 (exposure age). The usual record unpacks as is; one written
-- with fewer metrics (appended since: total 0, no pre value, zero bins) is
-- rebuilt; bins are kept only while the config tracks age.
local function parse_unit3(raw)
  local m, np, nb, f = sunpack(UNIT3_TAIL, raw, #raw - UNIT3_TAIL_LEN + 1)
  if AGE and m == n_met and nb == NB then
    local u = {sunpack(unit3_fmt(m, np, nb), raw)}  -- ..., m, np, nb, f, next position
    if np > 0 then u[1] = 4 else u[1] = 3 end
    u[age_base(u) + A_LEN + 5] = nil
    return u
  end
  local vals = {sunpack(unit3_fmt(m, np, nb), raw)}
  local u = {np > 0 and 2 or 1, vals[2], vals[3], vals[4], vals[5], vals[6]}
  for k = 1, n_met do u[U_ETS + k] = k <= m and vals[U_ETS + k] or 0.0 end
  if np > 0 then
    for k = 1, n_met do
      if k <= np then u[U_PRE + k] = vals[U_ETS + m + k] else u[U_PRE + k] = NAN end
    end
  end
  if AGE then
    u[1] = u[1] + 2
    local base, src = age_base(u), U_ETS + m + np
    for k = 1, n_met do
      for b = 1, NB do
        local x = 0.0
        if k <= m and b <= nb then x = vals[src + (k - 1) * nb + b] end
        u[base + (k - 1) * NB + b] = x
      end
    end
    base = base + A_LEN
    u[base + 1], u[base + 2], u[base + 3], u[base + 4] = n_met, np > 0 and n_met or 0, NB, f
  end
  return u
end
local function parse_unit(raw)
  if not raw then return false end
  local v = byte(raw, 1)
  if v == 2 then return parse_unit2(raw) end
  if v == 3 then return parse_unit3(raw) end
  if v ~= 1 then return parse_unit_text(raw) end
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

-- foreign[uid]: the unit has a record but was created on another source
-- partition (it is in that source's pending zset, not in ours: a unit stays
-- pending on its creating source until it retires); its events here count
-- cross_partition (semantics.EVENT_NOTES). Units created in this call are ours.
local foreign = {}
do
  local have = {}
  for _, uid in ipairs(uids) do
    if units[uid] then have[#have + 1] = uid end
  end
  for i = 1, #have, CHUNK do
    local j = min(i + CHUNK - 1, #have)
    local sc = call('ZMSCORE', K_PENDING, unpack(have, i, j))
    for k = i, j do
      if not sc[k - i + 1] then foreign[have[k]] = true end
    end
  end
end

-- Rule 6: the retired-unit filter (streams/state/retired_filter.py, the same bits).
-- retired[uid] = true when every bit of the unit is set in some layer in
-- use; looked up once, before the events, for the units without a record
-- (units retire only in the settle below, after the events).
local RC0, RBITS, RK = 65536, 24, 16
-- the last layer the bitmap holds: MAX_LAYER, or lower where the server's
-- string limit (proto-max-bulk-len) is (found by ret_layer, kept in meta)
-- RET: cap (that layer), dirty (cap found in this call), fit (the last layer
-- known to fit), layer (ret_layer below)
local RET = {cap = tonumber(mraw[6]) or 10, dirty = false}
local function layer_of(nr)
  local l = 0
  while l < RET.cap and nr >= RC0 * (2 ^ (l + 1) - 1) do l = l + 1 end
  return l
end
local function ret_positions(uid, l, outp)
  local h = redis.sha1hex(uid)
  local h1, h2 = tonumber(sub(h, 1, 8), 16), tonumber(sub(h, 9, 16), 16)
  if h2 % 2 == 0 then h2 = h2 + 1 end
  local start, m = RC0 * RBITS * (2 ^ l - 1), RC0 * RBITS * 2 ^ l
  for i = 0, RK - 1 do outp[#outp + 1] = start + (h1 + i * h2) % m end
  return outp
end
local retired = {}
if retired_n > 0 then
  local ask = {}
  for _, uid in ipairs(uids) do
    if units[uid] == false then ask[#ask + 1] = uid end
  end
  local layers = layer_of(retired_n - 1) + 1
  local per = RK * layers
  local step = math.max(1, floor(CHUNK / (3 * per)))  -- units per BITFIELD call
  for i = 1, #ask, step do
    local args, j2 = {}, min(i + step - 1, #ask)
    for j = i, j2 do
      local pos = {}
      for l = 0, layers - 1 do ret_positions(ask[j], l, pos) end
      for _, q in ipairs(pos) do
        args[#args + 1] = 'GET'; args[#args + 1] = 'u1'; args[#args + 1] = fmti(q)
      end
    end
    local bits = call('BITFIELD', K_RET, unpack(args))
    for j = i, j2 do
      local base = (j - i) * per
      for l = 0, layers - 1 do
        local all = true
        for q = 1, RK do
          if bits[base + l * RK + q] == 0 then all = false; break end
        end
        if all then retired[ask[j]] = true; break end
      end
    end
  end
end
-- The layer of the nr-th retirement. A layer not used yet is first probed
-- (a read of its last bit, by pcall: it cannot fail): where the string
-- cannot hold it, the layer before is the cap (retired_filter.MAX_LAYER's
-- doc), so the BITFIELD SET below never fails after the first writes.
RET.fit = layer_of(retired_n > 0 and retired_n - 1 or 0)  -- in use: it fits
function RET.layer(nr)
  local l = layer_of(nr)
  while l > RET.fit do
    local last = RC0 * RBITS * (2 ^ (l + 1) - 1) - 1
    local got = redis.pcall('BITFIELD', K_RET, 'GET', 'u1', fmti(last))
    if type(got) == 'table' and got.err then
      RET.cap, RET.dirty = l - 1, true
      l = l - 1
    else
      RET.fit = l
    end
  end
  return l
end
local function touch_unit(uid)
  if not units_dirty[uid] then units_dirty[uid] = true; units_order[#units_order + 1] = uid end
end

-- Held metrics: held[uid] = array of {mi, ts, v}, false (none), nil (not read).
local held, held_dirty, held_order = {}, {}, {}
local held_exists = call('EXISTS', K_HELD) == 1
local function parse_held(raw)
  if not raw then return false end
  local lst = {}
  for pos = 1, #raw, HELD_LEN do
    local mi, ts, v = sunpack(HELD_FMT, raw, pos)
    lst[#lst + 1] = {mi, ts, v}
  end
  return lst
end
local function held_of(uid)
  local h = held[uid]
  if h == nil then
    if held_exists then h = parse_held(call('HGET', K_HELD, uid)) else h = false end
    held[uid] = h
  end
  return h
end
local function touch_held(uid)
  if not held_dirty[uid] then held_dirty[uid] = true; held_order[#held_order + 1] = uid end
end

-- Aggregated increments, written once at the end.
local counts, count_order = {}, {}
local function count(cat, k)
  local c = counts[cat]
  if c == nil then count_order[#count_order + 1] = cat; c = 0 end
  counts[cat] = c + (k or 1)
end
local exposed, matured = {}, {}          -- by variant index (0-based)
local act_n, act_sum = {}, {}            -- by stratum
local arr, arr_order = {}, {}            -- "stratum|bucket" -> new units

-- Cells: row_of(v, s) = {cell_1, ..., cell_M}, each {n, sum_y, sum_y2, nx,
-- sum_x, sum_x2, sum_xy, sum_y_x}, read from Redis on first use (a cell
-- written with 3 fields reads the other five as 0).
local cells, cells_order, cell_rows = {}, {}, {}
local NO_X = ' 0 0 0 0 0'   -- the covariate sums of a cell without a unit with an x
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
        local a, b, d, rest = match(raw[k], '^(%S+) (%S+) (%S+)(.*)$')
        c = {tonumber(a), tonumber(b), tonumber(d), 0, 0.0, 0.0, 0.0, 0.0}
        if rest ~= NO_X and rest ~= '' then  -- '': written before the covariate sums
          local e, f, g, h, i = match(rest, '^ (%S+) (%S+) (%S+) (%S+) (%S+)$')
          c[4], c[5], c[6], c[7], c[8] = tonumber(e), tonumber(f), tonumber(g), tonumber(h),
            tonumber(i)
        end
      else
        c = {0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0}
      end
      row[k] = c
      cells[fields[k]] = c
      cells_order[#cells_order + 1] = fields[k]
    end
    rv[s] = row
  end
  return row
end

-- Age cells (issue 19), in the cells hash: field a|<metric>|<variant>|<fine>
-- -> "n Σy_0 Σy_0² ... Σy_{NB-1} Σy_{NB-1}² Σy_0·y_{NB-1}" (AC_X numbers);
-- age_row_of(v, f) = {age cell of metric 1, ...}, read on first use.
local age_rows, age_cells, age_order = {}, {}, {}
local function age_row_of(v, f)
  local rv = age_rows[v]
  if rv == nil then rv = {}; age_rows[v] = rv end
  local row = rv[f]
  if row == nil then
    row = {}
    local sfx = '|' .. variants[v + 1] .. '|' .. fmti(f)
    local fields = {}
    for k = 1, n_met do fields[k] = 'a|' .. metrics[k] .. sfx end
    local raw = call('HMGET', K_CELLS, unpack(fields))
    for k = 1, n_met do
      local c = {0}
      for j = 2, AC_X do c[j] = 0.0 end
      if raw[k] then
        local j = 0
        for tok in string.gmatch(raw[k], '%S+') do
          j = j + 1
          if j > AC_X then break end
          c[j] = tonumber(tok)
        end
      end
      row[k] = c
      age_cells[fields[k]] = c
      age_order[#age_order + 1] = fields[k]
    end
    rv[f] = row
  end
  return row
end

-- Rule 3 for a unit that exists (also a released held metric).
local function metric_rule(uid, u, mi, ts, v, T)
  local ets = u[U_ETS]
  local close = ets + W
  if ts < ets then return 'pre_exposure' end
  if ts >= close then return 'outside_window' end
  if close + H <= T then return 'late' end
  local c = U_ETS + mi
  local t = u[c]
  u[c] = t + v
  local aged, bin, base, tb = u[1] >= 3, 0, 0, nil
  if aged then  -- the bin total of the metric's exposure age (age_bin_of)
    local age = ts - ets
    for k = NB - 1, 1, -1 do
      if age >= age_edges[k + 1] then bin = k; break end
    end
    base = age_base(u) + (mi - 1) * NB
    local ab = base + bin + 1
    tb = u[ab]
    u[ab] = tb + v
  end
  touch_unit(uid)
  if u[U_M] ~= 1 then  -- folded later, with its total
    if close > T then return 'metric_applied' end
    return 'corrected'
  end
  -- folded: correct the cell whatever T says (T is the clock of the partition
  -- the metric came through, maybe not its unit's: issue 24, defect 2)
  if variants[u[U_V] + 1] ~= nil then
    local cell = row_of(u[U_V], u[U_S])[mi]
    cell[2] = cell[2] + v
    cell[3] = cell[3] + ((t + v) * (t + v) - t * t)
    if u[1] == 2 or u[1] == 4 then
      local xk = u[U_PRE + mi]
      if xk == xk then
        cell[7] = cell[7] + xk * v
        cell[8] = cell[8] + v
      end
    end
    if aged then
      local ac = age_row_of(u[U_V], u[age_base(u) + A_LEN + 4])[mi]
      local j = 2 + 2 * bin
      ac[j] = ac[j] + v
      ac[j + 1] = ac[j + 1] + ((tb + v) * (tb + v) - tb * tb)
      if bin == 0 then
        ac[AC_X] = ac[AC_X] + v * u[base + NB]
      elseif bin == NB - 1 then
        ac[AC_X] = ac[AC_X] + u[base + 1] * v
      end
    end
  end
  return 'corrected'
end

local pend_new = {}            -- ZADD arguments: close, uid, close, uid, ...

-- Pass 2: the rules, event by event.
for i = 1, n do
  local eid, ts, clk, uid = E_EID[i], E_TS[i], E_CLK[i], E_UID[i]
  local cat
  local prev = seen[eid]
  if E_KIND[i] == 'x' and E_A[i] > 0 and ts + W + H <= clk - L then
    cat = 'too_old'  -- rule 2, before anything else (dedupe too): ingest dead-letters it
  elseif prev and prev >= clk - DD then
    cat = 'duplicate'
  else
    if not seen_new[eid] then seen_new[eid] = true; seen_order[#seen_order + 1] = eid end
    seen[eid] = clk
    if max_ts == nil or ts > max_ts then max_ts = ts; max_ts_dirty = true end
    local T = clk - L
    if E_KIND[i] == 'x' then
      local vi = E_A[i] - 1
      local u = units[uid]
      if vi < 0 then
        cat = 'unknown_variant'
      elseif u then
        if foreign[uid] then count('cross_partition') end
        if u[U_V] == vi then cat = 'repeat_exposure' else cat = 'conflict' end
      elseif retired[uid] then
        cat = 'retired'
      elseif end_at ~= nil and ts >= end_at then
        cat = 'after_end'
      else
        if anchor == nil then anchor = started_cfg or 0; anchor_dirty = true end
        local x = E_B[i]
        local st = S
        if x ~= nil and S > 0 then
          st = 0
          for k = S, 1, -1 do
            if x >= edges[k] then st = k - 1; break end
          end
        end
        local bucket, outcome = nil, 'exposures'
        if anchor ~= 0 then
          bucket = floordiv(ts - anchor, B)
          if ts < anchor then bucket = 0; outcome = 'before_start' end  -- clamped, applied
        else
          bucket = floordiv(ts, B)
        end
        u = {1, vi, st, 0, bucket, ts}
        for k = 1, n_met do u[U_ETS + k] = 0.0 end
        if has_pres then take_pre(u, E_PRE[i]) end
        if AGE then  -- exposure-age bins and the fine stratum (stratum_of, fine_edges)
          local fs = NF
          if x ~= nil and NF > 0 then
            fs = 0
            for k = NF, 1, -1 do
              if x >= fine_edges[k] then fs = k - 1; break end
            end
          end
          u[1] = u[1] + 2
          local base = age_base(u)
          for j = base + 1, base + A_LEN do u[j] = 0.0 end
          base = base + A_LEN
          u[base + 1], u[base + 2], u[base + 3], u[base + 4] = n_met,
            u[1] == 4 and n_met or 0, NB, fs
        end
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
        pend_new[#pend_new + 1] = ts + W
        pend_new[#pend_new + 1] = uid
        count(outcome)
        local h = held_of(uid)
        if h then
          held[uid] = false
          touch_held(uid)
          count('held', -#h)
          for k = 1, #h do
            local r = h[k]
            count(metric_rule(uid, u, r[1], r[2], r[3], T))
          end
        end
      end
    else
      local mi = E_A[i]
      local u = units[uid]
      if mi == 0 then
        cat = 'unknown_metric'
      elseif u then
        if foreign[uid] then count('cross_partition') end
        cat = metric_rule(uid, u, mi, ts, E_B[i], T)
      elseif retired[uid] then  -- rule 6: its close + H <= T
        if ts > T - H then cat = 'outside_window' else cat = 'late' end
      else
        local h = held_of(uid)
        if (h and #h or 0) >= HM then
          cat = 'expired'
        else
          if not h then h = {}; held[uid] = h end
          h[#h + 1] = {mi, ts, E_B[i]}
          touch_held(uid)
          cat = 'held'
        end
      end
    end
  end
  if cat then count(cat) end
end

-- ---------------------------------------------------------------- settle
-- Rule 5 and hold expiry at the partition clock (max of the stored one and
-- clk_end), after the new pending units and holds are in Redis, so that the
-- ZSET order decides both, as in the reducer.
-- A call whose events were all applied before (a replay) does not settle:
-- its clk_end may be later than the original call's (the partition clock was
-- stored after it), and settling belongs to the calls that bring events or
-- to explicit settle calls (no events).
local clk = clk_prev
local settling = (#heads == 0 and DL.n == 0) or n > 0
if settling and (clk == nil or clk_end > clk) then clk = clk_end end
if #pend_new > 0 then chunked('ZADD', K_PENDING, pend_new) end
for _, uid in ipairs(held_order) do
  local h = held[uid]
  if h and #h > 0 then
    local buf, newest = {}, nil
    for k = 1, #h do
      local r = h[k]
      buf[k] = spack(HELD_FMT, r[1], r[2], r[3])
      if newest == nil or r[2] > newest then newest = r[2] end
    end
    call('HSET', K_HELD, uid, table.concat(buf))
    call('ZADD', K_HELDQ, newest, uid)
  else
    call('HDEL', K_HELD, uid)
    call('ZREM', K_HELDQ, uid)
  end
end

local more = 0
local work = false
-- rule 6: ZREM, ZADD at close + H, units retired, their filter bits
local gone, rescore, retired_ids, ret_set = {}, {}, {}, {}
if settling and clk ~= nil then
  local due = call('ZRANGEBYSCORE', K_PENDING, '-inf', fmti(clk - L), 'LIMIT', 0, FOLD_LIMIT + 1)
  if #due > FOLD_LIMIT then more = 1; due[FOLD_LIMIT + 1] = nil end
  if #due > 0 then
    work = true
    local miss = {}
    for j = 1, #due do
      if units[due[j]] == nil then miss[#miss + 1] = due[j] end
    end
    fetch_units(miss)
    for j = 1, #due do
      local uid = due[j]
      local u = units[uid]
      if u and u[U_M] == 0 then
        -- a unit whose variant the config lost (configs must only grow) is
        -- marked folded without a cell, rather than stopping ingest
        if variants[u[U_V] + 1] ~= nil then
          local row = row_of(u[U_V], u[U_S])
          local has_x = u[1] == 2 or u[1] == 4
          for k = 1, n_met do
            local y = u[U_ETS + k]
            local c = row[k]
            c[1] = c[1] + 1
            c[2] = c[2] + y
            c[3] = c[3] + y * y
            if has_x then
              local xk = u[U_PRE + k]
              if xk == xk then
                c[4] = c[4] + 1
                c[5] = c[5] + xk
                c[6] = c[6] + xk * xk
                c[7] = c[7] + xk * y
                c[8] = c[8] + y
              end
            end
          end
          if u[1] >= 3 then
            local a0 = age_base(u)
            local arow = age_row_of(u[U_V], u[a0 + A_LEN + 4])
            for k = 1, n_met do
              local ac, base = arow[k], a0 + (k - 1) * NB
              ac[1] = ac[1] + 1
              for b = 0, NB - 1 do
                local yb = u[base + b + 1]
                ac[2 + 2 * b] = ac[2 + 2 * b] + yb
                ac[3 + 2 * b] = ac[3 + 2 * b] + yb * yb
              end
              ac[AC_X] = ac[AC_X] + u[base + 1] * u[base + NB]
            end
          end
          matured[u[U_V]] = (matured[u[U_V]] or 0) + 1
        end
        u[U_M] = 1
        touch_unit(uid)
      end
      -- rule 6: final (close + H <= T) -> retire; else pending at close + H
      if u then
        local fin = u[U_ETS] + W + H
        if fin <= clk - L then
          gone[#gone + 1] = uid
          retired_ids[#retired_ids + 1] = uid
          ret_positions(uid, RET.layer(retired_n), ret_set)
          retired_n = retired_n + 1
          units[uid] = false
        else
          rescore[#rescore + 1] = fin
          rescore[#rescore + 1] = uid
        end
      else
        gone[#gone + 1] = uid
      end
    end
    chunked('ZREM', K_PENDING, gone)
    if #rescore > 0 then chunked('ZADD', K_PENDING, rescore) end
  end
end
if settling and clk ~= nil then
  local due = call('ZRANGEBYSCORE', K_HELDQ, '-inf', '(' .. fmti(clk - Hh),
                   'LIMIT', 0, FOLD_LIMIT + 1)
  if #due > FOLD_LIMIT then more = 1; due[FOLD_LIMIT + 1] = nil end
  if #due > 0 then
    work = true
    for j = 1, #due do
      local h = held_of(due[j])
      local k = h and #h or 0
      if k > 0 then count('held', -k); count('expired', k) end
    end
    chunked('HDEL', K_HELD, due)
    chunked('ZREM', K_HELDQ, due)
  end
end

-- ---------------------------------------------------------------- write back
local seq = tonumber(call('GET', K_DIRTY)) or 0
local buf, nb = {}, 0
local function flush(cmd, key)
  if nb > 0 then call(cmd, key, unpack(buf, 1, nb)); nb = 0 end
end
local function push2(cmd, key, x, y)
  buf[nb + 1] = x; buf[nb + 2] = y; nb = nb + 2
  if nb >= CHUNK then flush(cmd, key) end
end
local UNIT2_FMT = unit2_fmt(n_met)
for _, uid in ipairs(units_order) do
  local u = units[uid]
  if not u then  -- retired in this call: deleted below
  elseif u[1] >= 3 then  -- the array is the record, version byte aside
    local v3 = u[1]
    local np, last = v3 == 4 and n_met or 0, age_base(u) + A_LEN + 4
    u[1] = 3
    push2('HSET', K_UNITS, uid, spack(unit3_fmt(n_met, np, NB), unpack(u, 1, last)))
    u[1] = v3
  elseif u[1] == 2 then
    push2('HSET', K_UNITS, uid, spack(UNIT2_FMT, 2, u[U_V], u[U_S], u[U_M], u[U_B], u[U_ETS],
                                      n_met, unpack(u, U_ETS + 1, U_PRE + n_met)))
  else
    push2('HSET', K_UNITS, uid, spack(UNIT_FMT, unpack(u, 1, U_ETS + n_met)))
  end
end
flush('HSET', K_UNITS)
if retired_n > retired_n0 then
  chunked('HDEL', K_UNITS, retired_ids)
  for i = 1, #ret_set, CHUNK do
    local args = {}
    for j = i, min(i + CHUNK - 1, #ret_set) do
      args[#args + 1] = 'SET'; args[#args + 1] = 'u1'; args[#args + 1] = fmti(ret_set[j])
      args[#args + 1] = 1
    end
    call('BITFIELD', K_RET, unpack(args))
  end
  call('HSET', K_META, 'retired_n', fmti(retired_n))
end
if RET.dirty then call('HSET', K_META, 'retired_cap', fmti(RET.cap)) end
if own_write then call('HSET', K_META, own_write, fmti(epoch)) end
for _, f in ipairs(cells_order) do
  local c = cells[f]
  local head = fmti(c[1]) .. ' ' .. fmt(c[2]) .. ' ' .. fmt(c[3])
  if c[4] == 0 then
    -- no unit with an x: the covariate sums are still their initial zeros
    push2('HSET', K_CELLS, f, head .. NO_X)
  else
    push2('HSET', K_CELLS, f, head .. ' ' .. fmti(c[4]) .. ' ' .. fmt(c[5]) .. ' ' ..
          fmt(c[6]) .. ' ' .. fmt(c[7]) .. ' ' .. fmt(c[8]))
  end
end
for _, f in ipairs(age_order) do
  local c = age_cells[f]
  local parts = {fmti(c[1])}
  for j = 2, AC_X do parts[j] = fmt(c[j]) end
  push2('HSET', K_CELLS, f, table.concat(parts, ' '))
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
for _, name in ipairs(count_order) do
  if counts[name] ~= 0 then call('HINCRBY', K_META, 'c:' .. name, counts[name]) end
end
if max_ts_dirty then push2('HSET', K_META, 'max_ts', fmti(max_ts)) end
if anchor_dirty then push2('HSET', K_META, 'anchor', fmti(anchor)) end
if clk ~= clk_prev then push2('HSET', K_META, CLK_FIELD, fmti(clk)) end
flush('HSET', K_META)
for _, eid in ipairs(seen_order) do push2('ZADD', K_SEEN, seen[eid], eid) end
flush('ZADD', K_SEEN)
-- A sighting counts while its clock >= clk - DD; clk only grows, so older
-- sightings of this partition can never mark a duplicate again.
if clk ~= nil then call('ZREMRANGEBYSCORE', K_SEEN, '-inf', '(' .. fmti(clk - DD)) end
for _, f in ipairs(DL.order) do call('HINCRBY', K_META, f, DL.by[f]) end
do  -- the applied offset: the last event's, or a later dead letter's
  local off = n > 0 and E_OFF[n] or nil
  if DL.hi ~= nil and (off == nil or DL.hi > off) then off = DL.hi end
  if off ~= nil then call('HSET', K_OFF, src, fmti(off)); stored = off end
end
if n > 0 or work or DL.hi ~= nil then seq = call('INCR', K_DIRTY) end

local out = {'applied', n, 'skipped', skipped,
             'offset', stored and fmt(stored) or '',
             'max_ts', max_ts and fmt(max_ts) or '',
             'more', more,
             'dirty_seq', seq}
for _, name in ipairs(count_order) do
  out[#out + 1] = name
  out[#out + 1] = counts[name]
end
return out
