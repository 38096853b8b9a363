--[[
liftstream routing index, one round trip per batch (streams.state.route_rows).

KEYS: the unit index keys `lr:{u:<unit_id>}:x` to read (HGETALL), then those
to write. On a Redis Cluster they lie in many slots: there streams.state uses
a pipeline of the same commands instead.
ARGV: 1 the number of keys to read; 2 the marker prefix "<topic>|<partition>|"
('' = position unknown: marker '*'); 3 one packed string with, per key to
write, "<experiment_id>\31<offset>\30": HSETNX key experiment_id marker
(the first exposure's position wins; idempotent).
Returns the HGETALL replies of the keys read, in order.
]]
local n_read = tonumber(ARGV[1])
local prefix = ARGV[2]
local out = {}
for i = 1, n_read do out[i] = redis.call('HGETALL', KEYS[i]) end
local k = n_read
for e, off in string.gmatch(ARGV[3], '([^\31]*)\31([^\30]*)\30') do
  k = k + 1
  local marker = '*'
  if prefix ~= '' then marker = prefix .. off end
  redis.call('HSETNX', KEYS[k], e, marker)
end
return out
