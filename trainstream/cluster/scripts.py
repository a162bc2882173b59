"""
The cluster's Lua scripts: each runs atomically in Redis, so no two servers
can interleave inside one (docs/cluster.md, "Keys" and "One publish").

Numbers go to Redis as ``string.format('%d', n)``: Lua 5.1 writes a number
of 15 digits or more with an exponent (``1e+15``), which would be no id.
"""

from __future__ import annotations

#: One publish batch. KEYS: counter, stream, epoch, time index, batch token.
#: ARGV: floor, maxlen, retention (ms, 0: none), epoch candidate, origin,
#: token ('' for none), n, then n pairs (segment, event JSON without id).
#: Returns {first id, epoch}.
PUBLISH = r"""
local floor = tonumber(ARGV[1])
local maxlen = tonumber(ARGV[2])
local retention = tonumber(ARGV[3])
local token = ARGV[6]
local n = tonumber(ARGV[7])
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[3], epoch)
end
if token ~= '' then
  local done = redis.call('GET', KEYS[5])
  if done then return {tonumber(done), epoch} end
end
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if last < floor then last = floor end
local tail = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if tail[1] then
  local top = tonumber(string.match(tail[1][1], '^(%d+)'))
  if top > last then last = top end
end
local first = last + 1
for i = 0, n - 1 do
  local id = string.format('%d', first + i)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, id .. '-0',
             's', ARGV[8 + 2 * i], 'e', ARGV[9 + 2 * i], 'o', ARGV[5])
end
redis.call('SET', KEYS[1], string.format('%d', first + n - 1))
if token ~= '' then
  redis.call('SET', KEYS[5], string.format('%d', first), 'EX', 600)
end
if retention > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[4], now, string.format('%d', first))
  local cutoff = now - retention
  local keep = redis.call('ZRANGEBYSCORE', KEYS[4], cutoff, '+inf', 'LIMIT', 0, 1)
  if keep[1] then
    redis.call('XTRIM', KEYS[2], 'MINID', keep[1] .. '-0')
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. string.format('%d', cutoff))
end
return {first, epoch}
"""

#: On each (re)connect, before any publish. KEYS: counter, epoch.
#: ARGV: floor, epoch candidate. The counter never goes below what this
#: server has seen (Redis lost its data: ids still never go back).
#: Returns {counter, epoch}.
HELLO = r"""
local floor = tonumber(ARGV[1])
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[2], epoch)
end
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if last < floor then
  last = floor
  redis.call('SET', KEYS[1], string.format('%d', floor))
end
return {last, epoch}
"""

#: The leader lease. KEYS: lease. ARGV: node, milliseconds. 1 if this node holds it.
LEASE = r"""
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
