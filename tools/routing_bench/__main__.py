"""``python -m tools.routing_bench`` (``scripts/bench-routing``): LLM-aware routing benchmark (issue #16).

Four inference-mode mock backends (mock_llm/inference.py: KV prefix cache, prefill time per
uncached token, slots, decode time per token), a deterministic multi-turn workload
(tools/routing_bench/workload.py) replayed by concurrent users, once per target:

- ``direct``: client-side round-robin over the backends, no proxy;
- ``nginx``: nginx with a round-robin upstream;
- ``ntonix``: the gateway, once per ``--policies`` entry and ``--gateway-workers`` count
  (``NTONIX_ROUTING_POLICY=<policy>``; cache off unless ``--cache-on``, so only routing counts);
- ``ntonix_l4``: ``--l4-gateways`` such gateways (cache off, ``cache.redis_url`` on one
  redis-server) behind HAProxy in TCP mode (tools/scaleout.py), each turn on a new connection;
- ``reference``: the single-process reference router (tools/routing_bench/routers.py);
- ``user_hash``: each conversation pinned to a backend by a hash of the user.

With ``--real-llamacpp``, the backends are real llama.cpp servers instead (SmolLM2-135M on the CPU,
tests/live/llamacpp.py), restarted before every target, with a much smaller workload.

Every row starts from empty backend caches. One table (backend prefill tokens computed, cached
ratio, TTFT p50/p99, end-to-end p99, requests per backend, failures), then issue #16's targets.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402 - after monkey-patching, as gevent requires
import datetime  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from tests.live.llamacpp import served_model  # noqa: E402
from tools.routing_bench import procs  # noqa: E402
from tools.routing_bench.routers import ReferenceRouter, RoundRobin, UserHash  # noqa: E402
from tools.routing_bench.run import Target, replay  # noqa: E402
from tools.routing_bench.stats import (  # noqa: E402
    Row,
    l4_checks,
    l4_label,
    limit_checks,
    model_checks,
    prefix_checks,
    real_checks,
    slow_checks,
    table,
)
from tools.routing_bench.workload import QUICK, REAL, Spec, conversations, total_prompt_tokens, working_set_blocks  # noqa: E402

TARGETS = ("direct", "nginx", "ntonix", "reference", "user_hash", "ntonix_l4")
POLICIES = ("round_robin", "least_requests", "prefix")


def _csv(cast: Callable[[str], object]) -> Callable[[str], list[object]]:
    def parse(text: str) -> list[object]:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/bench-routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small workload (32 users, 4 groups, 512-token system "
                   "prompts, 4 rounds, 32-token turns, 0-200 ms think time), 1 gateway worker: under a minute")
    p.add_argument("--real-llamacpp", action="store_true", help="variant: real llama.cpp servers (xllamacpp, "
                   "SmolLM2-135M, one thread each; requirements-llama.txt) instead of the mocks, a small workload "
                   "(6 users, 2 groups, 48-word system prompts, 4 rounds of 8-word questions and 8-token answers), "
                   "targets direct,ntonix,reference, policies round_robin,prefix, 1 gateway worker: a few minutes")
    w = p.add_argument_group("workload (defaults: the issue's; --quick: smaller)")
    for name, default in (("users", 64), ("groups", 8), ("system-tokens", 1024), ("rounds", 8),
                          ("question-tokens", 64), ("answer-tokens", 64), ("think-ms", 500), ("seed", 1)):
        w.add_argument(f"--{name}", type=int, default=None, help=f"default {default}")
    b = p.add_argument_group("backends")
    b.add_argument("--backends", type=int, default=None, help="default 4 (--real-llamacpp: 2)")
    b.add_argument("--slots", type=int, default=4, help="--real-llamacpp: parallel slots per server")
    b.add_argument("--ctx", type=int, default=2048, help="--real-llamacpp: context tokens per server (all slots)")
    b.add_argument("--kv-ratio", type=float, default=3.12,
                   help="workload KV working set ÷ one backend's KV cache capacity (3.12: 78%% of four)")
    b.add_argument("--prefill-us", type=float, default=200.0, help="µs per uncached prompt token")
    b.add_argument("--decode-ms", type=float, default=20.0, help="ms per output token")
    b.add_argument("--max-num-seqs", type=int, default=16, help="requests running at once per backend")
    b.add_argument("--stream-interval", type=int, default=16, help="output tokens per stream event after the first")
    b.add_argument("--slow", action="store_true", help="variant: the last backend is twice as slow "
                   "(prefill and decode), for least_requests")
    b.add_argument("--models", type=_csv(str), default=[], help="variant: mixed traffic, e.g. m1,m2: backend i "
                   "serves models[i %% n] only, user u asks models[u %% n]")
    t = p.add_argument_group("targets")
    t.add_argument("--targets", type=_csv(str), default=None, help=f"default {','.join(TARGETS)}")
    t.add_argument("--policies", type=_csv(str), default=None,
                   help="ntonix routing policies (a policy the gateway does not know yet: its row notes "
                        "that the gateway did not start)")
    t.add_argument("--gateway-workers", type=_csv(int), default=None, help="default 1,2,4 (--quick: 1)")
    t.add_argument("--l4-gateways", type=int, default=2, help="ntonix_l4: gateways behind HAProxy (default 2)")
    t.add_argument("--cache-on", action="store_true", help="leave the gateway's response cache on")
    t.add_argument("--max-in-flight", type=int, default=0, help="variant: backends[].max_in_flight of the "
                   "gateway; checks that no backend ever held more of its requests at once")
    t.add_argument("--prefix-block-chars", type=int, default=0, help="the gateway's routing.prefix_block_chars "
                   "(default: the gateway's, 256); --real-llamacpp's prompts are short, a few blocks of 64")
    t.add_argument("--out", type=Path, help="also write the report (Markdown) to this file")
    args = p.parse_args(argv)
    real = args.real_llamacpp
    if args.targets is None:
        # ntonix_l4 only when asked for: it needs redis-server and haproxy.
        args.targets = ["direct", "ntonix", "reference"] if real else list(TARGETS[:-1])
    if args.policies is None:
        args.policies = ["round_robin", "prefix"] if real else list(POLICIES)
    if args.backends is None:
        args.backends = 2 if real else 4
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        p.error(f"--targets: unknown {sorted(unknown)}; choose from {','.join(TARGETS)}")
    if args.l4_gateways < 1:
        p.error("--l4-gateways: at least 1")
    base = REAL if real else QUICK if args.quick else Spec()
    changes = {k: getattr(args, k) for k in ("users", "groups", "system_tokens", "rounds", "question_tokens",
                                             "answer_tokens", "think_ms", "seed") if getattr(args, k) is not None}
    args.spec = replace(base, **changes, models=tuple(args.models))
    if real:
        # The gateway routes by model: requests must name the one the servers list.
        args.spec = replace(args.spec, models=(served_model(),))
    if args.gateway_workers is None:
        args.gateway_workers = [1] if args.quick or real else [1, 2, 4]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.scrub_environment()
    spec: Spec = args.spec
    ws_blocks = working_set_blocks(spec)
    kv_tokens = args.ctx if args.real_llamacpp else max(16, math.ceil(ws_blocks * 16 / args.kv_ratio))
    folder = Path(tempfile.mkdtemp(prefix="ntonix-bench-routing-"))
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    say(f"# Routing benchmark, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    unit = "word" if args.real_llamacpp else "token"  # the workload's 4-character words are the mock's tokens
    say(f"workload: {spec.users} users in {spec.groups} groups, {spec.system_tokens}-{unit} system prompts, "
        f"{spec.rounds} rounds of {spec.question_tokens}-{unit} questions and {spec.answer_tokens}-token answers, "
        f"0-{spec.think_ms} ms think time, seed {spec.seed}; {spec.users * spec.rounds} requests, "
        f"{total_prompt_tokens(spec):,} prompt {unit}s")
    if args.real_llamacpp:
        say(f"backends: {args.backends} × llama.cpp (xllamacpp, SmolLM2-135M-Instruct Q4_1, 1 thread, "
            f"{args.slots} slots, {args.ctx} context tokens), restarted before every row; answers "
            f"exactly {spec.answer_tokens} tokens (ignore_eos); token counts are the servers' own"
            + (f"; gateway prefix blocks of {args.prefix_block_chars} characters" if args.prefix_block_chars else ""))
    else:
        say(f"backends: {args.backends} × mock_llm --inference: KV cache {kv_tokens:,} tokens each (working set "
            f"{ws_blocks * 16:,} tokens = {ws_blocks * 16 / kv_tokens:.2f} × one, "
            f"{ws_blocks * 16 / kv_tokens / args.backends:.0%} of all), prefill {args.prefill_us:g} µs/token "
            f"(one at a time), decode {args.decode_ms:g} ms/token, {args.max_num_seqs} running at once, "
            f"{args.stream_interval} tokens per event" + (", last backend twice as slow" if args.slow else "")
            + (f", models {'/'.join(args.models)}" if args.models else ""))
    backends: list[procs.BenchBackend] = []
    used = [False]

    def fresh() -> None:
        """Real servers: cold caches before the next row's proxy sees them (mocks: ``replay`` resets)."""
        if used[0]:
            for backend in backends:
                backend.restart()
        used[0] = True

    rows: list[Row] = []
    notes: list[str] = []
    try:
        for i in range(args.backends):
            if args.real_llamacpp:
                backends.append(procs.LlamaBackend(f"l{i + 1}", args.slots, args.ctx, spec.answer_tokens))
                continue
            slow = 2.0 if args.slow and i == args.backends - 1 else 1.0
            models = (args.models[i % len(args.models)],) if args.models else ()
            mock = procs.MockSpec(f"b{i + 1}", kv_tokens, args.prefill_us * slow / 1e6, args.decode_ms * slow / 1e3,
                                  args.max_num_seqs, args.stream_interval, spec.answer_tokens, models)
            backends.append(procs.start_backend(mock))
        convs = conversations(spec)
        n = len(backends)
        for name in args.targets:
            if name == "direct":
                fresh()
                rows.append(replay(Target("direct", router=RoundRobin(n)), convs, spec, backends))
            elif name == "reference":
                fresh()
                router = ReferenceRouter(n, capacity_blocks=kv_tokens * 4 // 64)
                rows.append(replay(Target("reference", router=router), convs, spec, backends))
            elif name == "user_hash":
                fresh()
                rows.append(replay(Target("user_hash", router=UserHash(n)), convs, spec, backends))
            elif name == "nginx":
                if procs.nginx_binary() is None:
                    notes.append("nginx: not installed (apt-get install nginx), row skipped")
                    continue
                fresh()
                proc, port = procs.start_nginx(folder, backends)
                try:
                    rows.append(replay(Target("nginx", port=port), convs, spec, backends))
                finally:
                    proc.stop()
            elif name == "ntonix_l4":
                for workers in args.gateway_workers:
                    for policy in args.policies:
                        label = l4_label(policy, args.l4_gateways, workers)
                        fresh()
                        try:
                            topo = procs.start_l4(folder / f"l4-{policy}-w{workers}", backends, args.l4_gateways,
                                                  workers, policy, args.prefix_block_chars)
                        except (RuntimeError, SystemExit) as exc:
                            said = [line for line in str(exc).splitlines() if line.strip()]
                            notes.append(f"{label}: did not start ({said[-1][:200] if said else exc!r})")
                            continue
                        try:
                            rows.append(replay(Target(label, port=topo.lb_port, reconnect=True), convs, spec,
                                               backends))
                        finally:
                            topo.stop()
            else:
                for workers in args.gateway_workers:
                    for policy in args.policies:
                        label = f"ntonix {policy} w{workers}"
                        fresh()
                        try:
                            proc, port = procs.start_gateway(folder / label.replace(" ", "-"), backends, workers,
                                                             policy, args.cache_on, args.max_in_flight,
                                                             args.prefix_block_chars)
                        except (TimeoutError, RuntimeError) as exc:
                            said = [line for line in str(exc).splitlines() if line.strip()]
                            notes.append(f"{label}: the gateway did not start ({said[-1][:200] if said else exc!r})")
                            continue
                        try:
                            rows.append(replay(Target(label, port=port), convs, spec, backends))
                        finally:
                            proc.stop()
            print(f"  done: {rows[-1].label if rows else name}", file=sys.stderr, flush=True)
    finally:
        for backend in reversed(backends):
            backend.stop()
    baseline = next((r for r in rows if r.label == "direct"), None) or next(
        (r for r in rows if "round_robin" in r.label), None)
    say()
    say(table(rows, baseline))
    for note in notes:
        say(f"note: {note}")
    by_label = {r.label: r for r in rows}
    say()
    say("Targets (issue #16" + (", #17" if "ntonix_l4" in args.targets else "") + "):")
    if args.max_in_flight:
        checks = limit_checks(by_label, args.max_in_flight)
    elif args.slow:
        checks = slow_checks(by_label, args.gateway_workers)
    elif args.models:
        checks = model_checks(by_label)
    elif args.real_llamacpp:
        checks = real_checks(by_label, args.gateway_workers)
    else:
        checks = prefix_checks(by_label, args.gateway_workers)
    if "ntonix_l4" in args.targets:
        checks += l4_checks(by_label, args.gateway_workers, args.l4_gateways)
    for check in checks:
        say("  " + check.line())
    if args.out:
        args.out.write_text("\n".join(out) + "\n")
    return 1 if any(c.ok is False for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
