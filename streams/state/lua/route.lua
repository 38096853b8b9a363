--[[
liftstream routing index, one round trip per batch (streams.state.store.route_rows).

First the writes, then the reads, so the reads show this batch's exposures:
HSETNX records each exposure's position as its unit's first exposure to the
experiment (the first position wins; idempotent, so a replay writes nothing);
then, per unit looked up, the routing index (HGETALL lr:{u:<unit>}:x) and the
metrics held for it without experiment_id (HGETALL lr:{u:<unit>}:held).

KEYS: the index keys of the units looked up, then their held keys, then the
index keys of the exposures to record. On a Redis Cluster they lie in many
slots: there streams.state.store uses a pipeline of the same commands instead.
ARGV: 1 the number of units looked up; 2 how many of them (the first ones)
need their index in any case (units of metrics without experiment_id); the
others (units exposed in the batch) need it only if they have held metrics;
3 the marker prefix "<topic>|<partition>|" ('' = position unknown: marker
'*'); 4 one packed string with, per exposure, "<experiment_id>\31<offset>\30";
5 the index's time to live in ms (streams.state.store.index_ttl_ms; 0 = none),
renewed by every exposure, so the index holds the units active lately. The
TTL only ever grows: a key whose remaining PTTL is longer (a longer
experiment of the unit set it, in another batch) keeps it; a key without one
gets it (issue 24, defect 4).
Returns, per unit looked up, its index then its held metrics (flat lists), or
0 for a unit of the second kind without held metrics (the common case: one
reply element instead of two lists).
]]
local n = tonumber(ARGV[1])
local n_always = tonumber(ARGV[2])
local prefix = ARGV[3]
local ttl = tonumber(ARGV[5]) or 0
local k = 2 * n
for e, off in string.gmatch(ARGV[4], '([^\31]*)\31([^\30]*)\30') do
  k = k + 1
  local marker = '*'
  if prefix ~= '' then marker = prefix .. off end
  redis.call('HSETNX', KEYS[k], e, marker)
  if ttl > 0 and redis.call('PTTL', KEYS[k]) < ttl then redis.call('PEXPIRE', KEYS[k], ttl) end
end
local out = {}
for i = 1, n do
  local held = redis.call('HGETALL', KEYS[n + i])
  if i <= n_always or #held > 0 then
    out[i] = {redis.call('HGETALL', KEYS[i]), held}
  else
    out[i] = 0
  end
end
return out
