"""wrk's Lua script for the bench: unique or identical chat bodies, results as one JSON line."""

from __future__ import annotations

import json

WRK_LUA = r"""
-- args: mode ("unique" | "same" | "stream": unique, streamed), nonce, path
local mode, nonce, path = "unique", "0", "/v1/chat/completions"
local counter = 0
local headers = {["Content-Type"] = "application/json"}
local same_body
function init(args)
  mode = args[1] or mode
  nonce = args[2] or nonce
  path = args[3] or path
  same_body = '{"model":"bench-model","messages":[{"role":"user","content":"the same prompt ' .. nonce
    .. ', every time"}],"temperature":0}'
end
function request()
  if mode == "same" then
    return wrk.format("POST", path, headers, same_body)
  end
  counter = counter + 1
  local stream = ""
  if mode == "stream" then
    stream = ',"stream":true'
  end
  return wrk.format("POST", path, headers, '{"model":"bench-model","messages":[{"role":"user","content":'
    .. '"unique prompt ' .. nonce .. '-' .. counter .. ': say hello"}],"temperature":0' .. stream .. '}')
end
%STAGGER%
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""

# The first request of each connection waits a random 0..BENCH_STAGGER_MS ms: with a 1 s backend, wrk's
# connections would otherwise send in lockstep waves (all at once, every second) instead of
# at a steady rate. wrk starts its latency clock when the request is written, after the delay.
WRK_STAGGER = r"""
local stagger_ms = tonumber(os.getenv("BENCH_STAGGER_MS") or "0")
local first = tonumber(os.getenv("BENCH_CONNS") or "0")
math.randomseed(os.time())
function delay()
  if first > 0 then
    first = first - 1
    return math.random(0, stagger_ms)
  end
  return 0
end
"""


def lua_script(stagger: bool) -> str:
    """The script, with or without the staggered first request per connection."""
    return WRK_LUA.replace("%STAGGER%", WRK_STAGGER if stagger else "")


def parse_done(stdout: str) -> dict[str, int] | None:
    """The ``BENCH_JSON {...}`` line the script's ``done()`` prints, or None."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    return None if line is None else dict(json.loads(line[len("BENCH_JSON "):]))


def figures(w: dict[str, int]) -> dict[str, object]:
    """req/s, latency percentiles in ms and error counts from wrk's summary."""
    n = w["requests"]
    kinds = ("connect", "read", "write", "timeout", "status")
    return {"rps": n / (w["duration_us"] / 1e6) if w["duration_us"] else 0.0, "requests": n,
            "p50_ms": w["p50_us"] / 1000, "p99_ms": w["p99_us"] / 1000, "max_ms": w["max_us"] / 1000,
            "errors": sum(w[k] for k in kinds), "errors_detail": {k: w[k] for k in kinds if w[k]}}
