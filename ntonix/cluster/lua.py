"""The Lua scripts of ntonix/cluster/flights.py and affinity.py: each runs atomically in Redis, so
a join, a finish, a detach or a load exchange is one step that no other gateway can interleave
with (ADR 0009)."""

from __future__ import annotations

from ntonix.cluster.resp import sha1

# KEYS: k, f, a(proc)[, cached answer]; ARGV: flight value, lease ms, flight ttl ms, prefix.
# A follower also adds the flight's token to its leader process's set ``w:<proc>``, which that
# process's keeper pops every tick: it learns which of its flights gained followers in one
# command, whatever the number of flights it leads.
# Returns {answer} when the optional 4th key holds one (the Redis cache tier's entry: the
# re-check a miss makes after joining, in the same round trip), else the value of the flight
# to follow, or nil when the caller now leads (under ARGV[1]).
JOIN = """
if #KEYS >= 4 then
  local hit = redis.call('GET', KEYS[4])
  if hit then return {hit} end
end
local cur = redis.call('GET', KEYS[1])
if cur then
  local proc = string.match(cur, ' (.*)$')
  if proc and redis.call('EXISTS', ARGV[4] .. 'a:' .. proc) == 1 then
    local tok = string.match(cur, '^(%S+)')
    redis.call('INCR', ARGV[4] .. 'f:' .. tok)
    redis.call('PEXPIRE', ARGV[4] .. 'f:' .. tok, ARGV[3])
    redis.call('SADD', ARGV[4] .. 'w:' .. proc, tok)
    redis.call('PEXPIRE', ARGV[4] .. 'w:' .. proc, ARGV[3])
    return cur
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
return false
"""

# KEYS: k, f, s[, the answer's key in the cache tier]; ARGV: flight value, journaling 0/1, ok 0/1,
# grace ms, the answer and its lifetime in ms (with the 4th key; else "" and 0), then kind, data
# pairs. The answer is stored before the flight ends, so a gateway asking in between finds one or
# the other; a refused SET (e.g. Redis at maxmemory) leaves it unshared and still ends the flight.
# Returns 1 when followers exist but the leader has not published: call again with records.
FINISH = """
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[2] == '0' and n > 0 and ARGV[3] == '1' and #ARGV == 6 then return 1 end
if #KEYS >= 4 then redis.pcall('SET', KEYS[4], ARGV[5], 'PX', ARGV[6]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if ARGV[2] == '0' and n == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  return 0
end
for i = 7, #ARGV, 2 do redis.call('XADD', KEYS[3], '*', ARGV[i], ARGV[i + 1]) end
redis.call('XADD', KEYS[3], '*', 'e', ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 0
"""

# KEYS: k; ARGV: flight value. Later requests start their own flight.
DETACH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

SCRIPTS = {"join": JOIN, "finish": FINISH, "detach": DETACH}
SHAS = {name: sha1(src) for name, src in SCRIPTS.items()}


# KEYS: the load hash; ARGV: this host's id, its in-flight counts (JSON), how old (ms, by Redis's
# clock: the hosts' own clocks may disagree) another host's counts may be, the hash's ttl ms.
# Stores this host's counts stamped with Redis's time, drops the stale ones of hosts gone
# quiet, and returns the other hosts' fresh counts (ntonix/cluster/affinity.py, ``sync``).
LOAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], now .. ' ' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local host, v = all[i], all[i + 1]
  if host ~= ARGV[1] then
    local sp = string.find(v, ' ', 1, true)
    local at = sp and tonumber(string.sub(v, 1, sp - 1))
    if not at or now - at > tonumber(ARGV[3]) then
      redis.call('HDEL', KEYS[1], host)
    else
      out[#out + 1] = string.sub(v, sp + 1)
    end
  end
end
return out
"""
