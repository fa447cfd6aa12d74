#!/usr/bin/env python3
"""Generate docs/configuration.md from the configuration model (``ntonix.config``).

    python scripts/gen_config_docs.py            # (re)write docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 when the file is not up to date

Types, defaults and environment names come from the model (``leaf_keys()``, ``env_name()``,
``ENV_SHORTCUTS``, ``ALIASES``, ``PATH_KEYS``); the words come from the tables below. Every key
of the model must have a description and a reload rule here, so a new key cannot go
undocumented: tests/unit/test_config_docs.py fails, and so does this script.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import typing
from collections.abc import Mapping
from typing import Any

from ntonix import config as model
from tools import ROOT

OUTPUT = ROOT / "docs" / "configuration.md"

SECTION_INTRO = {
    "server": "Listeners and worker processes (gunicorn's settings are derived from these).",
    "proxy": "How requests are forwarded to backends.",
    "pool": "Keep-alive connections to each backend, per worker process.",
    "health": "Active health checks: every worker sends `GET health.path` to every backend.",
    "circuit_breaker": "Passive ejection: consecutive failures of real requests open a backend's breaker.",
    "cache": "The response cache: L1 in each worker's memory, L2 in LMDB shared by the workers of a host, "
             "optional L3 in Redis shared by several gateways.",
    "ssl": "The HTTPS listener on `server.ssl_port`. While `server.ssl_port` is 0 no certificate is needed: the "
           "files and ciphers are not checked (the other keys still must be valid values).",
    "logging": "Structured logs of the master and all workers.",
    "metrics": "statsd output and access to the gateway's own `/metrics` and `/cache/stats`.",
    "routing": "How a backend is chosen for each request (see docs/adr/0008-prefix-routing.md for `prefix`).",
}

DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("server", "host"): "Listen address of both listeners. `::` for IPv6 (and IPv4 where the system maps it).",
    ("server", "port"): "Plain HTTP port.",
    ("server", "ssl_port"): "HTTPS port; `0` = no HTTPS listener (then no certificate is needed).",
    ("server", "threads"): "Number of worker processes (alias `server.workers`). Each worker serves many "
                           "connections at once with gevent.",
    ("server", "graceful_timeout_s"): "On TERM: how long in-flight requests and streams may finish before the "
                                      "workers cut what is left (each logs it and exits 0; the master "
                                      "kills a worker still there 3 s later).",
    ("server", "keepalive_s"): "How long an idle client keep-alive connection is kept open (rounded up to whole "
                               "seconds); also the time a client has to send a request's headers.",
    ("server", "body_timeout_s"): "How long a client has to send a request's whole body once its headers are "
                                  "in (→ 408, connection closed).",
    ("server", "worker_connections"): "Most client connections one worker serves at once; more wait in the "
                                      "listen backlog.",
    ("server", "max_request_line"): "Longest request line in bytes (longer → 414).",
    ("server", "max_header_bytes"): "Longest single request header field in bytes (longer → 431).",
    ("server", "max_headers"): "Most request header fields (more → 431).",
    ("proxy", "connect_timeout_s"): "Connecting to a backend; also the longest wait for a free connection when "
                                    "`pool.max_size` are busy. Either failure tries another backend.",
    ("proxy", "read_timeout_s"): "Longest wait for a backend's response headers (→ 504), and longest silence "
                                 "between two pieces of a streamed body (→ the stream is cut). A stream whose "
                                 "events keep flowing is never cut.",
    ("proxy", "retries"): "How many other backends a request that could not be sent is tried on. A request "
                          "that reached a backend is never sent twice.",
    ("proxy", "max_body_bytes"): "Request body limit in bytes (over → 413).",
    ("proxy", "trusted_proxies"): "Addresses or networks (`10.0.0.0/8`) of proxies in front of the gateway: for "
                                  "requests from them, `X-Real-IP` and the logs take the client address from "
                                  "`X-Forwarded-For`. `X-Forwarded-For` is always appended to, never replaced.",
    ("pool", "size"): "Idle connections kept warm per backend, per worker.",
    ("pool", "max_size"): "Most connections per backend, per worker (idle and busy together).",
    ("pool", "idle_timeout_s"): "Idle connections beyond `pool.size` are closed after this long.",
    ("health", "enabled"): "`false`: no probes; backends are then only ejected by the circuit breaker.",
    ("health", "path"): "Path probed with `GET`; status 200 = good, anything else (or no answer) = bad.",
    ("health", "interval_s"): "Time between two probes of one backend (±10 % jitter per worker), counted from "
                              "the end of a round: all backends are probed together, and a round lasts as long "
                              "as its slowest probe (at most `timeout_s`, when a backend hangs). Also the "
                              "`Retry-After` of a 503 when no backend is healthy.",
    ("health", "timeout_s"): "A probe that takes longer counts as failed.",
    ("health", "unhealthy_threshold"): "Consecutive failed probes that take a backend out of rotation.",
    ("health", "healthy_threshold"): "Consecutive good probes that bring it back (its breaker closes too).",
    ("circuit_breaker", "failure_threshold"): "Consecutive failed requests (connection refused or reset, "
                                              "timeout) that open a backend's breaker: no traffic to it.",
    ("circuit_breaker", "cooldown_s"): "Time an open breaker waits before one trial request; success closes it. "
                                       "Good health probes close it earlier.",
    ("cache", "enabled"): "Cache cacheable requests (`POST` to `/v1/chat/completions`, `/v1/completions`, "
                          "`/v1/embeddings`, status 200) and coalesce identical ones in flight.",
    ("cache", "max_size_mb"): "Bound of the host-wide store (L2) in MiB of stored responses; least recently used "
                              "entries are evicted first. (Redis is bounded by its own `maxmemory`.)",
    ("cache", "ttl_seconds"): "Lifetime of an entry from when it was stored, in every tier.",
    ("cache", "memory_max_mb"): "Bound of each worker's in-memory L1 in MiB (at most `max_size_mb / 4`; `0` = "
                                "no L1).",
    ("cache", "dir"): "Folder of the L2 store and the coalescing journal. Empty: a private folder that is "
                      "removed at exit; set it to keep the cache across restarts.",
    ("cache", "redis_url"): "`redis://[:password@]host:port/db`, `rediss://...` (TLS) or `unix:///path[?db=N]`: "
                            "the L3 tier, shared by every gateway using it. Empty = no Redis. An address that "
                            "is not one (scheme, port, database) stops start-up; an unreachable Redis means "
                            "misses, never errors.",
    ("cache", "partition_headers"): "Request headers that partition the cache, on top of the built-in "
                                    "`Authorization`, `Proxy-Authorization`, `X-Api-Key`, `Api-Key`, `Cookie`, "
                                    "`OpenAI-Organization`, `OpenAI-Project` (e.g. `X-Tenant`). A list, or "
                                    "comma-separated in the environment. Values are hashed, never kept.",
    ("cache", "max_entry_bytes"): "Largest answer the cache records (4 MiB): a larger one is relayed unchanged "
                                  "but neither held in memory nor stored, and the coalescing journal keeps "
                                  "no more than this per flight beyond what attached followers still need.",
    ("cache", "purge_token"): "Bearer token for `POST /cache/purge`. Empty: purging over HTTP is disabled (403).",
    ("ssl", "cert_file"): "PEM certificate (chain) of the HTTPS listener.",
    ("ssl", "key_file"): "PEM private key of `ssl.cert_file`.",
    ("ssl", "sni"): "More certificates by host name: `{\"api.example.com\": {\"cert_file\": ..., \"key_file\": "
                    "...}}`; `*.example.com` covers one label. Exact names win over wildcards; others get "
                    "`ssl.cert_file`.",
    ("ssl", "handshake_timeout_s"): "A client that has not finished the TLS handshake by then is disconnected.",
    ("ssl", "ciphers"): "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's). TLS 1.2 is the minimum.",
    ("logging", "level"): "`debug`, `info`, `warning` or `error`.",
    ("logging", "format"): "`json` (one object per line) or `text`.",
    ("logging", "file"): "Log to this file instead of stderr, rotated by size.",
    ("logging", "max_bytes"): "Rotate `logging.file` at this size (`0` = never).",
    ("logging", "backup_count"): "Rotated files kept (`<file>.1` ...).",
    ("logging", "access_log"): "One `request.done` line per request (at `info`).",
    ("metrics", "statsd_host"): "statsd server (UDP). Empty = no statsd output.",
    ("metrics", "statsd_port"): "statsd UDP port.",
    ("metrics", "statsd_prefix"): "Prefix of every statsd metric name.",
    ("metrics", "allow"): "Addresses or networks allowed to read `/metrics` and `/cache/stats` (others get "
                          "403). Empty = everyone.",
    ("routing", "policy"): "`round_robin` (smooth weighted round-robin), `least_requests` (fewest requests in "
                           "flight relative to weight, over all workers of the host) or `prefix` (KV-cache "
                           "aware: a prompt sharing a long prefix with earlier ones goes where that prefix was "
                           "served, unless that backend is markedly busier; others go to the least loaded).",
    ("routing", "queue_timeout_s"): "A request for which every suitable backend is at its `max_in_flight` waits "
                                    "(first come, first served) up to this long, then gets 503 with "
                                    "`Retry-After`. Below the usual 60 s client timeouts, so clients see the 503.",
    ("routing", "prefix_block_chars"): "`prefix`: the prompt is matched in blocks of this many characters "
                                       "(256 ≈ 64 tokens); a shorter tail is not matched.",
    ("routing", "prefix_balance_factor"): "`prefix`: a backend whose in-flight requests per weight exceed this "
                                          "factor × the host average (plus one request) gets no request for "
                                          "the sake of its cache (bounded-load affinity).",
    ("routing", "prefix_load_blocks"): "`prefix`: how many matched prompt blocks one more request in flight "
                                       "(per weight) is worth when trading cache affinity against load; `0` = "
                                       "longest match wins within the balance bound.",
    ("routing", "prefix_index_entries"): "`prefix`: entries (prompt blocks) of the host-wide prefix index "
                                         "(24 bytes each; the default is 6 MiB); the least recently seen are "
                                         "forgotten first. Size it near the backends' total KV cache in blocks.",
}

# When a changed value takes effect: "HUP" (kill -HUP <master pid>) or "restart".
HUP, RESTART = "HUP", "restart"
RELOAD: dict[tuple[str, str], str] = {
    ("server", "host"): RESTART,
    ("server", "port"): RESTART,
    ("server", "ssl_port"): RESTART,
    ("server", "threads"): "HUP (workers are started or stopped to match)",
    ("server", "graceful_timeout_s"): RESTART,
    ("server", "keepalive_s"): RESTART,
    ("server", "body_timeout_s"): HUP,
    ("server", "worker_connections"): RESTART,
    ("server", "max_request_line"): RESTART,
    ("server", "max_header_bytes"): RESTART,
    ("server", "max_headers"): RESTART,
    ("proxy", "connect_timeout_s"): "HUP (pools of backends already configured keep theirs until restart)",
    ("proxy", "read_timeout_s"): HUP,
    ("proxy", "retries"): HUP,
    ("proxy", "max_body_bytes"): HUP,
    ("proxy", "trusted_proxies"): HUP,
    ("pool", "size"): "HUP for backends added by the reload; restart for the others",
    ("pool", "max_size"): "HUP for backends added by the reload; restart for the others",
    ("pool", "idle_timeout_s"): "HUP for backends added by the reload; restart for the others",
    **{("health", k): HUP for k in ("enabled", "path", "interval_s", "timeout_s")},
    ("health", "unhealthy_threshold"): HUP,
    ("health", "healthy_threshold"): HUP,
    ("circuit_breaker", "failure_threshold"): HUP,
    ("circuit_breaker", "cooldown_s"): HUP,
    **{("cache", k): RESTART for k in ("enabled", "max_size_mb", "ttl_seconds", "memory_max_mb", "dir",
                                        "redis_url", "partition_headers", "max_entry_bytes")},
    ("cache", "purge_token"): HUP,
    **{("ssl", k): HUP for k in ("cert_file", "key_file", "sni", "handshake_timeout_s", "ciphers")},
    ("logging", "level"): HUP,
    ("logging", "format"): HUP,
    ("logging", "file"): HUP,
    ("logging", "max_bytes"): HUP,
    ("logging", "backup_count"): HUP,
    ("logging", "access_log"): HUP,
    ("metrics", "statsd_host"): HUP,
    ("metrics", "statsd_port"): HUP,
    ("metrics", "statsd_prefix"): HUP,
    ("metrics", "allow"): HUP,
    ("routing", "policy"): HUP,
    ("routing", "queue_timeout_s"): HUP,
    ("routing", "prefix_block_chars"): HUP,
    ("routing", "prefix_balance_factor"): HUP,
    ("routing", "prefix_load_blocks"): HUP,
    ("routing", "prefix_index_entries"): RESTART,
}

# Command-line flags of `python -m ntonix` (tests/unit/test_config_docs.py checks them against
# ntonix.__main__.parser()).
FLAGS: dict[tuple[str, str], str] = {
    ("server", "port"): "--port",
    ("server", "ssl_port"): "--ssl-port",
    ("server", "threads"): "--workers",
    ("logging", "level"): "--log-level",
}
OTHER_FLAGS = {
    "--config FILE": "configuration file (default `conf/ntonix.json`, or `NTONIX_CONFIG`)",
    "--backends LIST": "the backend list, as `NTONIX_BACKENDS`",
    "--check-config": "validate everything (certificates included) and exit: 0 valid, 2 invalid",
    "--help": "all options",
}


# ----------------------------------------------------------------------------- rendering


def type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    if typ is bool:
        return "boolean"
    if typ is int:
        return "integer"
    if typ is float:
        return "number"
    if typ is str:
        return "string"
    if origin is tuple:
        return "list of strings"
    if origin is not None and issubclass(origin, Mapping):
        return "object"
    raise ValueError(f"no documentation name for type {typ!r}")


def default_text(section: str, key: str, value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, Mapping):
        value = dict(value)
    text = f"`{json.dumps(value)}`"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        text += f" ({value // (1024 * 1024)} MiB)"
    if (section, key) in model.PATH_KEYS and value:
        text += " (next to the config file)"
    return text


def env_text(section: str, key: str, typ: Any) -> str:
    if type_name(typ) == "object":
        return f"`{model.env_name(section, key)}` (the object as JSON text)"
    names = [f"`{model.env_name(section, key)}`"]
    names += [f"`{short}`" for short, target in model.ENV_SHORTCUTS.items() if target == (section, key)]
    names += [f"`{model.env_name(s, a)}`" for (s, a), target in model.ALIASES.items() if target == (section, key)]
    flag = FLAGS.get((section, key))
    if flag:
        names.append(f"`{flag}`")
    return "<br>".join(names)


def missing() -> list[str]:
    """Keys of the model without a description or reload rule, and stale entries of the tables."""
    keys = {(s, k) for s, k, _, _ in model.leaf_keys()}
    problems = [f"{s}.{k}: no description in tools/gen_config_docs.py" for s, k in sorted(keys - set(DESCRIPTIONS))]
    problems += [f"{s}.{k}: no reload rule in tools/gen_config_docs.py" for s, k in sorted(keys - set(RELOAD))]
    for table, name in ((DESCRIPTIONS, "DESCRIPTIONS"), (RELOAD, "RELOAD"), (FLAGS, "FLAGS")):
        problems += [f"{s}.{k}: in {name} but not in the model" for s, k in sorted(set(table) - keys)]
    return problems


def key_tables() -> str:
    out: list[str] = []
    current = ""
    for section, key, typ, default in model.leaf_keys():
        if section != current:
            current = section
            out += ["", f"### `{section}`", "", SECTION_INTRO.get(section, ""), "",
                    "| key | type | default | environment / flag | takes effect | meaning |",
                    "|---|---|---|---|---|---|"]
        alias = [a for (s, a), target in model.ALIASES.items() if target == (section, key)]
        name = f"`{section}.{key}`" + "".join(f"<br>(alias `{section}.{a}`)" for a in alias)
        out.append(f"| {name} | {type_name(typ)} | {default_text(section, key, default)} | "
                   f"{env_text(section, key, typ)} | {RELOAD[(section, key)]} | {DESCRIPTIONS[(section, key)]} |")
    return "\n".join(out).lstrip("\n")


def render() -> str:
    problems = missing()
    if problems:
        raise SystemExit("gen_config_docs: the model and the documentation tables disagree:\n  "
                         + "\n  ".join(problems))
    shortcuts = "\n".join(f"| `{name}` | `{s}.{k}` |" for name, (s, k) in model.ENV_SHORTCUTS.items())
    flags = "\n".join(f"| `{flag} N` | `{s}.{k}` |" if (s, k) != ("logging", "level") else f"| `{flag} L` | `{s}.{k}` |"
                      for (s, k), flag in FLAGS.items())
    others = "\n".join(f"| `{flag}` | {what} |" for flag, what in OTHER_FLAGS.items())
    path_keys = ", ".join(f"`{s}.{k}`" for s, k in sorted(model.PATH_KEYS))
    return TEMPLATE.format(
        default_path=model.DEFAULT_CONFIG_PATH, shortcuts=shortcuts, flags=flags, other_flags=others,
        path_keys=path_keys, key_tables=key_tables(), levels=", ".join(f"`{lv}`" for lv in model.LOG_LEVELS),
        wrr="(smooth weighted round-robin over the healthy backends)",
        seed=(ROOT / "conf" / "ntonix.json").read_text(encoding="utf-8"),
    )


TEMPLATE = """\
<!-- Generated by tools/gen_config_docs.py from ntonix/config/model.py: do not edit by hand.
     Run `python scripts/gen_config_docs.py`; tests/unit/test_config_docs.py checks it is current. -->

# Configuration

Every setting but `backends` has a built-in default; the shipped `conf/ntonix.json` names the
two mock backends `scripts/start` runs on ports 8001 and 8002, so that gateway needs no further
configuration. This page lists every key with its type, default, environment
variable and command-line flag, says when a change takes effect, and ends with recipes for
timeouts, HTTPS with SNI, a shared Redis cache, statsd and logging.

## Where settings come from

Four layers; a higher one wins, key by key:

1. the command line of `python -m ntonix` (a few flags, below);
2. the environment: `NTONIX_<SECTION>_<KEY>` for every key, plus a few short names;
3. the JSON file: `{default_path}` (relative to the working folder) unless `--config FILE` or
   `NTONIX_CONFIG` names another;
4. the built-in defaults listed below.

`gunicorn -c gunicorn.conf.py ntonix.wsgi` and `python -m ntonix` read the same layers and run
the same server. File paths written in the JSON file ({path_keys}, `ssl.sni` files) are taken
from the file's folder; paths given in the environment from the working folder.

The seed file `conf/ntonix.json` (its values override the built-in defaults while it is the file in use):

```json
{seed}```

### Environment

Every key below has a variable `NTONIX_<SECTION>_<KEY>` (`proxy.read_timeout_s` →
`NTONIX_PROXY_READ_TIMEOUT_S`). Values are text, converted by the key's type: booleans take
`1/true/yes/on` and `0/false/no/off`, lists are comma-separated (`NTONIX_METRICS_ALLOW=10.0.0.0/8,127.0.0.1`).
A variable starting `NTONIX_` that names no key is an error. Short names:

| variable | key |
|---|---|
| `NTONIX_CONFIG` | the configuration file |
{shortcuts}
| `NTONIX_BACKENDS` | `backends` (replaces the whole list) |

`NTONIX_BACKENDS` is a comma-separated list of `host:port` or `host:port:weight`, IPv6 in
brackets: `NTONIX_BACKENDS=10.0.0.5:8000:3,10.0.0.6:8000,[::1]:8001:2`.

### Command line

`python -m ntonix [options]`:

| flag | key |
|---|---|
{flags}

| flag | meaning |
|---|---|
{other_flags}

### Invalid configuration

Anything wrong (unknown key or variable, wrong type, port out of range, missing or unreadable
certificate, no backends, a file that is not JSON, nested too deeply or with a key given twice
in one object, a `server.host` that is no address of this host, a `cache.dir` that cannot be
created, one key given two different
values under two names such as `NTONIX_PORT` and `NTONIX_SERVER_PORT`, a bad command-line
option, ...) stops start-up before any worker starts: exit status 2 and one line on stderr
naming the key, e.g.
`ntonix: invalid configuration: backends[1].weight: must be >= 1, got 0`.
On `kill -HUP`, an invalid file is logged (`config.reload_rejected`) and the running
configuration keeps serving. `python -m ntonix --check-config` checks without starting.

## Reload (`kill -HUP`) or restart

`kill -HUP <master pid>` reads the file and the environment again and applies the result in
place: no worker restarts, no in-flight request or stream is dropped. What takes effect:

- **on HUP**: the backend list (added backends join at once, removed ones finish their
  in-flight requests and get no new ones, kept ones keep their health and breaker state),
  `health.*`, `circuit_breaker.*`, `proxy.*` timeouts, retries and limits, `logging.*`,
  certificates (`ssl.*`), `metrics.*`, `cache.purge_token`, `routing.*` (but
  `routing.prefix_index_entries`); `server.threads` starts or stops
  workers to match (a worker stopped that way drains as on TERM: its in-flight requests and
  streams get `server.graceful_timeout_s` to finish, then the rest is cut);
- **after a restart**: `server.host`, `server.port`, `server.ssl_port` (the master logs a
  warning when they changed), `server.worker_connections`, `server.keepalive_s`,
  `server.graceful_timeout_s` and the request limits of `server.*`, `cache.*` (but
  `purge_token`); `pool.*` and `proxy.connect_timeout_s` apply to backends added by a reload,
  the others keep their pools.

The column "takes effect" below says it per key.

## Keys

### `backends`

A list (order matters only for ties of the balancer); at least one entry.

| field | type | default | meaning |
|---|---|---|---|
| `host` | string | — | name or address (IPv6 without brackets in the file: `"::1"`); names: resolved ≤ once per 5 s |
| `port` | integer | — | 1-65535 |
| `weight` | integer | `1` | share of the traffic, ≥ 1: weights 1 and 3 give 25 % and 75 % {wrr} |
| `models` | list of strings | absent | model ids the backend serves; absent: learned from its \
`GET /v1/models` (a backend that does not answer it with a model list serves any model); `[]`: \
no model (drains it of named-model requests on HUP; requests that name none may still go there) |
| `max_in_flight` | integer | `0` | most requests in flight to it from this host, all workers \
together; `0` = no limit (see `routing.queue_timeout_s`) |

Environment `NTONIX_BACKENDS`, flag `--backends` (format above). Takes effect on HUP.

{key_tables}

## Connection pools

Each worker process keeps, for each backend, a pool of keep-alive HTTP/1.1 connections:

- `pool.size` idle connections are kept warm for the next requests;
- under load the pool grows up to `pool.max_size` connections (busy and idle); a request that
  finds all of them busy waits up to `proxy.connect_timeout_s` for one, then tries another backend
  (that is the gateway's limit, not a failure of the backend: its circuit breaker does not count
  it; when every backend tried is that busy, the answer is 503 `backends_busy` with `Retry-After`);
- idle connections beyond `pool.size` are closed after `pool.idle_timeout_s`;
- a connection goes back to the pool only when its response was read to the end and the backend
  allows keep-alive; a cut stream or a client that went away closes it.

So a gateway holds at most `server.threads × pool.max_size` connections to each backend.

## Memory: sizing a container

What the gateway holds is bounded by its configuration. Per **worker** (`server.threads` of them):

- the process itself (Python, gunicorn, gevent, NTONIX): about 25–40 MB resident once warm
  (`scripts/soak` and `scripts/bench` print it);
- the in-memory cache tier (L1): `cache.memory_max_mb` of stored answers (default: a quarter of
  `cache.max_size_mb`, at most 64);
- a request body being read: up to `proxy.max_body_bytes`, while it is read (bodies are read
  whole: the cache key and a retry on another backend need them);
- a cacheable answer being relayed: recorded for the cache as it passes, up to
  `cache.max_entry_bytes` per answer (default 4 MiB); larger answers are relayed but neither
  stored nor held (a coalescing leader keeps those same pieces for a follower who may still
  join: no second copy);
- an open client connection or stream: about 20–30 KB (greenlet, parser, socket objects; 1,000
  open SSE streams add 20–28 MB, docs/performance.md), plus one 64 KiB read block while a read
  from its backend is in flight;
- backend connections: at most `pool.max_size` per backend, a few KB each;
- the access log buffer: at most 64 KiB;
- the cache-hit fast path's memos (ntonix/gateway/proxy.py): at most 1 MiB of request bodies
  that were hits (none over 16 KiB) and the rendered headers of up to 4,096 entries (a few
  hundred bytes each), which keep their answers alive after L1 dropped them: at most a quarter
  of L1's size (at least 1 MiB) of answers.

Per **host**, once:

- the master process: about 20–30 MB;
- the shared cache tier (L2, LMDB): `cache.max_size_mb` of stored answers in a memory-mapped
  file (address space: twice that plus 64 MiB). Its pages are the kernel's page cache: they show
  in the RSS of every worker that reads them, or writes them (on ext4, xfs and tmpfs the store
  writes through its map, docs/adr/0003-shared-cache-store.md), so adding up `ps` counts them
  once per worker; they are shared and can be dropped under memory pressure: count them once;
- the coalescing journal (LMDB): the answers followers are waiting for, while in flight;
- Redis (L3): its own `maxmemory`, on its own host.

So a container needs about `30 MB + server.threads × (40 MB + 1.25 × L1 + connections in use × 25 KB)
+ cache.max_size_mb`, plus, for the worst case, the bodies and answers in flight: at most
`server.worker_connections` requests per worker, each with a body of at most
`proxy.max_body_bytes` and a recorded answer of at most `cache.max_entry_bytes`. Lower `server.worker_connections`
or `proxy.max_body_bytes` to lower that worst case; `scripts/bench` reports the RSS under load
(docs/performance.md).

## Recipes

### Timeouts

```json
{{
  "proxy":  {{"connect_timeout_s": 2, "read_timeout_s": 120, "retries": 2}},
  "server": {{"graceful_timeout_s": 60, "keepalive_s": 5}},
  "health": {{"interval_s": 5, "timeout_s": 2}}
}}
```

- `proxy.connect_timeout_s`: a backend that does not accept the connection in time counts as a
  failure and the request goes to another backend (up to `proxy.retries` others).
- `proxy.read_timeout_s`: no response headers in time → `504`; for a streamed answer, the longest
  gap between two events before the stream is cut. Set it above your slowest model's time to
  first token; a long stream that keeps producing tokens is never cut.
- `server.graceful_timeout_s`: on `kill -TERM`, how long streams still running may take to finish.

### HTTPS and SNI

```json
{{
  "server": {{"ssl_port": 8443}},
  "ssl": {{
    "cert_file": "certs/default.crt",
    "key_file":  "certs/default.key",
    "sni": {{
      "api.example.com": {{"cert_file": "certs/api.crt",      "key_file": "certs/api.key"}},
      "*.example.com":   {{"cert_file": "certs/wildcard.crt", "key_file": "certs/wildcard.key"}}
    }}
  }}
}}
```

Paths are relative to the config file. A client asking for `api.example.com` gets `api.crt`,
`chat.example.com` gets the wildcard, any other name (or none) the default certificate. Every
file is checked at start-up and on HUP: a missing file or a key that does not match its
certificate is a configuration error naming the key (`ssl.sni['api.example.com'].key_file: ...`).
New certificates are taken up with `kill -HUP`. `server.ssl_port: 0` (or `NTONIX_SSL_PORT=0`,
`--ssl-port 0`) turns HTTPS off and needs no certificate.

### A shared cache with Redis

```sh
NTONIX_CACHE_REDIS_URL=redis://cache.internal:6379/0 python -m ntonix
```

Every gateway pointed at the same Redis shares one cache: an answer stored by one is a hit on
all. Entries there expire with `cache.ttl_seconds`. Redis is optional: when it is down, lookups
are misses and stores are skipped (logged once when the outage starts and once when it ends).
Use `rediss://` for TLS and `redis://:password@host:6379/0` for a password. A `rediss://` address
verifies the server's certificate against the system's CAs; `?ssl_ca_certs=/path/ca.pem` names
another CA file, `?ssl_cert_reqs=none` turns the check off (as in redis-py's URLs).

### statsd

```json
{{"metrics": {{"statsd_host": "statsd.internal", "statsd_port": 8125, "statsd_prefix": "ntonix"}}}}
```

Per request the gateway sends counters and timers over UDP (`ntonix.requests`,
`ntonix.status.2xx`, `ntonix.cache.hit`, `ntonix.latency`, ...; see docs/api.md). Sending never
slows or fails a request. `GET /metrics` gives the same figures as JSON or Prometheus text.

### Logging

```sh
NTONIX_LOG_LEVEL=debug NTONIX_LOGGING_FORMAT=text python -m ntonix
```

Levels: {levels}. `json` writes one object per line with stable event names (`request.done`,
`backend.health_changed`, `config.reloaded`, ...).

The access log (`request.done`, one line per request) is buffered, as nginx's
`access_log ... buffer= flush=` is: each worker collects its lines and writes them in batches of
whole lines every 0.2 s, or at once when 64 KiB are waiting, before a reload (`kill -HUP`)
switches the destination, when it stops (`TERM`, `INT`, `QUIT`) and at exit. A line can
therefore appear up to 0.2 s after its request ended. A worker killed hard (`kill -9`, the
kernel's OOM killer, a crash of the interpreter) loses at most the lines of its last 0.2 s, never
more than 64 KiB; nothing else is lost. Writes to a pipe (stderr under a supervisor) are at most
4 KiB each, so the lines of different workers never interleave: a line that would be longer (a
request path of thousands of characters) has its client-given strings (`path`, `model`, `error`,
...) cut to 512 characters, ending in `...`.

`logging.file` is rotated by size: each worker looks at the file at most every 0.25 s, so a
rotated file can be larger than `logging.max_bytes` by what the workers wrote in that time (the
access log writes up to 64 KiB at once).
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is not up to date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(keepends=True), text.splitlines(keepends=True),
                "docs/configuration.md (committed)", "docs/configuration.md (generated)"))
            print("docs/configuration.md is out of date: run python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
