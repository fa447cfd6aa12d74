"""The bench's table and target check, from the recorded results (pure: no processes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tools.stats import fmt, med, span


@dataclass
class Result:
    scenario: str
    param: str
    target: str
    round: int
    m: dict[str, Any]


def ratio(x: float, y: float) -> float:
    return x / y if y else float("nan")


def diff(x: float, y: float) -> float:
    return x - y


GW = ("shipped", "stripped")  # "baseline" (--baseline) is someone else's revision: not checked
PROXY_FLOOR = "proxy floor"  # tools/bench/proxy_floor_app.py: the stack's own proxy, nothing of ours
CACHE_FLOOR = "cache floor"  # tools/bench/cache_floor_app.py: the proxy floor + the defaults' least work


class Table:
    def __init__(self, results: list[Result]) -> None:
        self.r = results
        self.lines: list[str] = []
        self.checks: list[tuple[str, str, bool | None]] = []

    def get(self, scenario: str, param: str, target: str, key: str) -> list[float]:
        return [x.m[key] for x in sorted(self.r, key=lambda x: x.round)
                if x.scenario == scenario and x.param == param and x.target == target and key in x.m]

    def paired(self, scenario: str, param: str, a: str, b: str, key_a: str, key_b: str | None = None,
               op: Callable[[float, float], float] = ratio) -> list[float]:
        """Per round: op(a's key_a, b's key_b)."""
        xa, xb = self.by_round(scenario, param, a, key_a), self.by_round(scenario, param, b, key_b or key_a)
        return [op(xa[k], xb[k]) for k in sorted(xa) if k in xb]

    def by_round(self, scenario: str, param: str, target: str, key: str) -> dict[int, float]:
        return {x.round: x.m[key] for x in self.r
                if (x.scenario, x.param, x.target) == (scenario, param, target) and x.m.get(key) is not None}

    def params(self, scenario: str) -> list[str]:
        seen: list[str] = []
        for x in self.r:
            if x.scenario == scenario and x.param not in seen:
                seen.append(x.param)
        return seen

    def targets(self, scenario: str, param: str) -> list[str]:
        seen: list[str] = []
        for x in self.r:
            if (x.scenario, x.param) == (scenario, param) and x.target not in seen:
                seen.append(x.target)
        return seen

    def other(self, sc: str, param: str, t: str) -> str:
        """Foreign CPU use on the proxy's / the load's core (median %), e.g. "3/12"."""
        return (f"{fmt(med(self.get(sc, param, t, 'other_proxy_pct')))}/"
                f"{fmt(med(self.get(sc, param, t, 'other_load_pct')))}")

    def check(self, name: str, shown: str, ok: bool | None) -> None:
        self.checks.append((name, shown, ok))

    def limit(self, name: str, values: list[float], bound: float, unit: str, digits: int = 2) -> None:
        """A check that the median of ``values`` is at most ``bound``."""
        m = med(values)
        self.check(name, f"{fmt(m, digits)}{unit}", m <= bound if values and m == m else None)

    def out(self, s: str = "") -> None:
        self.lines.append(s)

    def render(self) -> str:
        self.latency_section()
        self.wrk_section("1", "1. cache miss, small JSON")
        self.wrk_section("2", "2. cache hit (the same body every request)")
        self.slow_section()
        self.sse_section()
        self.big_section()
        self.tls_section()
        self.errors_check()
        self.out("")
        self.out("Targets (issue #14; gateway as shipped)")
        for name, shown, ok in self.checks:
            mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
            self.out(f"  [{mark}] {name}: {shown}")
        return "\n".join(self.lines)

    def _hdr(self, title: str, cols: str) -> None:
        self.out("")
        self.out(title)
        self.out(cols)

    def _wrk_row(self, sc: str, param: str, t: str, width: int = 11) -> None:
        errs = self.get(sc, param, t, "errors")
        self.out(f"  {param:<7} {t:<{width}} {span(self.get(sc, param, t, 'rps')):>26} "
                 f"{fmt(med(self.get(sc, param, t, 'p50_ms')), 2):>9} "
                 f"{fmt(med(self.get(sc, param, t, 'p99_ms')), 2):>9} {sum(errs):>7} "
                 f"{span(self.get(sc, param, t, 'cpu_us')):>20} "
                 f"{fmt(med(self.get(sc, param, t, 'cpu_util_pct'))):>5} "
                 f"{self.other(sc, param, t):>11}")

    def wrk_section(self, sc: str, title: str) -> None:
        if not self.params(sc):
            return
        self._hdr(title, f"  {'':<7} {'target':<9} {'req/s':>26} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} "
                         f"{'CPU µs/req':>20} {'CPU%':>5} {'other% P/L':>11}")
        for param in self.params(sc):
            for t in self.targets(sc, param):
                self._wrk_row(sc, param, t)
            floor = {g: self.paired(sc, param, g, "floor", "cpu_us") for g in GW}
            shown = "; ".join(f"{g}/floor CPU {span(v, 2)}" for g, v in floor.items() if v)
            vs = self.paired(sc, param, "shipped", "stripped", "cpu_us")
            if vs:
                shown += f"; shipped/stripped CPU {span(vs, 2)}"
            base = self.paired(sc, param, "shipped", "baseline", "cpu_us")
            if base:
                shown += f"; shipped/baseline CPU {span(base, 2)}"
            redis = self.paired(sc, param, "shipped+redis", "shipped", "cpu_us")
            if redis:
                shown += f"; shipped+redis/shipped CPU {span(redis, 2)}"
            pf = {g: self.paired(sc, param, g, PROXY_FLOOR, "cpu_us") for g in (*GW, "floor")}
            if any(pf.values()):  # the stack's own cost of a proxied round trip, apart from ours
                shown += "; " + "; ".join(f"{g}/proxy floor CPU {span(v, 2)}" for g, v in pf.items() if v)
            cf = [(g, self.paired(sc, param, g, CACHE_FLOOR, "cpu_us")) for g in ("shipped",)]
            cf.append((CACHE_FLOOR, self.paired(sc, param, CACHE_FLOOR, PROXY_FLOOR, "cpu_us")))
            if cf[0][1]:  # ours above the least the defaults need, and the stack's own cost of them
                shown += "; " + "; ".join(f"{g}/{CACHE_FLOOR if g == 'shipped' else PROXY_FLOOR} CPU {span(v, 2)}"
                                          for g, v in cf if v)
            thr = self.paired(sc, param, "shipped", "nginx", "rps")
            self.out(f"  {param:<7} ratios    {shown}; shipped/nginx req/s {span(thr, 3)}")
            if sc == "1":
                self.limit(f"cache miss CPU ≤ 2.5 × floor ({param})", floor["shipped"], 2.5, " ×")
                self.limit(f"as shipped ≤ 1.2 × stripped on a miss ({param})", vs, 1.2, " ×")
                if param == "c=500":
                    fair = [ratio(p99, p50) for p99, p50 in zip(self.get(sc, param, "shipped", "p99_ms"),
                                                                self.get(sc, param, "shipped", "p50_ms"), strict=True)]
                    self.limit("cache miss at c=500: p99 ≤ 4 × p50", fair, 4, " ×")
            else:
                hits = sorted({str(x.m.get("hit_checked")) for x in self.r
                               if x.scenario == sc and x.target == "shipped"})
                m = med(floor["shipped"])
                self.check(f"cache hit CPU ≤ 1.3 × floor ({param})", f"{fmt(m, 2)} × (X-Cache: {','.join(hits)})",
                           m <= 1.3 and hits == ["HIT"] if floor["shipped"] else None)

    def latency_section(self) -> None:
        self.added_section("7", "7. one client, one request at a time (latency added over direct)", 3, 3)

    def slow_section(self) -> None:
        self.added_section("3", "3. backend answering after 1 s (latency added over direct)", 1, 2)

    def added_section(self, sc: str, title: str, digits: int, added_digits: int) -> None:
        """Latency percentiles and what each proxy adds over direct, same round (scenarios 3 and 7)."""
        if not self.params(sc):
            return
        self._hdr(title, f"  {'':<7} {'target':<9} {'req/s':>10} {'p50 ms':>10} {'p99 ms':>10} {'errors':>7} "
                         f"{'added p50 ms':>22} {'added p99 ms':>22} {'CPU µs/req':>12} {'other% P/L':>11}")
        for param in self.params(sc):
            for t in self.targets(sc, param):
                add50 = self.paired(sc, param, t, "direct", "p50_ms", op=diff) if t != "direct" else []
                add99 = self.paired(sc, param, t, "direct", "p99_ms", op=diff) if t != "direct" else []
                self.out(f"  {param:<7} {t:<11} {fmt(med(self.get(sc, param, t, 'rps'))):>10} "
                         f"{fmt(med(self.get(sc, param, t, 'p50_ms')), digits):>10} "
                         f"{fmt(med(self.get(sc, param, t, 'p99_ms')), digits):>10} "
                         f"{sum(self.get(sc, param, t, 'errors')):>7} {span(add50, added_digits):>22} "
                         f"{span(add99, added_digits):>22} {fmt(med(self.get(sc, param, t, 'cpu_us'))):>12} "
                         f"{self.other(sc, param, t):>11}")
                if t == "shipped" and sc == "7":
                    self.limit("c=1: added latency p50 ≤ 0.3 ms", add50, 0.3, " ms", 3)
                    self.limit("c=1: added latency p99 ≤ 1 ms", add99, 1.0, " ms", 3)
                if t == "shipped" and sc == "3" and param == "c=1000":
                    self.limit("1 s backend at c=1000: added p99 ≤ 10 ms", add99, 10, " ms")

    def sse_section(self) -> None:
        sc = "4"
        if not self.params(sc):
            return
        self._hdr("4. SSE streams, 20 events 50 ms apart (TTFT from request sent to first event)",
                  f"  {'':<7} {'target':<9} {'streams':>8} {'intact':>8} {'TTFT p50 ms':>18} "
                  f"{'TTFT p99 ms':>20} {'added p99 ms':>16} {'RSS MB':>16} {'RSS added MB':>16} "
                  f"{'store file MB':>16} {'streams add MB':>16} {'CPU µs/stream':>14} {'other% P/L':>11}")
        for param in self.params(sc):
            for t in self.targets(sc, param):
                streams = sum(self.get(sc, param, t, "streams"))
                ok = sum(self.get(sc, param, t, "ok"))
                add99 = self.paired(sc, param, t, "direct", "ttft_p99_ms", op=diff) if t != "direct" else []
                self.out(f"  {param:<7} {t:<11} {streams:>8} {ok:>8} "
                         f"{span(self.get(sc, param, t, 'ttft_p50_ms'), 1):>18} "
                         f"{span(self.get(sc, param, t, 'ttft_p99_ms'), 1):>20} {span(add99, 1):>16} "
                         f"{span(self.get(sc, param, t, 'rss_mb'), 1):>16} "
                         f"{span(self.get(sc, param, t, 'added_mb'), 1):>16} "
                         f"{span(self.get(sc, param, t, 'file_mb'), 1):>16} "
                         f"{span(self.get(sc, param, t, 'streams_mb'), 1):>16} "
                         f"{fmt(med(self.get(sc, param, t, 'cpu_us_per_stream'))):>14} "
                         f"{self.other(sc, param, t):>11}")
            # Of the medians, not per round: nginx's few MB are near the sampling noise, and a
            # round where they round to 0 would make a per-round ratio meaningless.
            # "streams add": the RSS added less the store file's pages (tools/bench/meter.py
            # ``file_share``; anonymous memory, the L1's entries included, all counts).
            n_added = med(self.get(sc, param, "nginx", "streams_mb"))
            added = [ratio(med(self.get(sc, param, "shipped", "streams_mb")), n_added)] if n_added > 0 else []
            add_n = self.paired(sc, param, "shipped", "nginx", "ttft_p99_ms", op=diff)
            self.out(f"  {param:<7} ratios    shipped/nginx memory the streams add (medians) {span(added, 1)}; "
                     f"shipped TTFT p99 over nginx {span(add_n, 1)} ms")
            add99 = self.paired(sc, param, "shipped", "direct", "ttft_p99_ms", op=diff)
            if param == "C=500":
                self.limit("SSE C=500: TTFT p99 ≤ direct + 10 ms", add99, 10, " ms over direct", 1)
            if param == "C=1000":
                streams = sum(self.get(sc, param, "shipped", "streams"))
                ok = sum(self.get(sc, param, "shipped", "ok"))
                self.check("SSE C=1000: every stream intact", f"{ok}/{streams} byte-identical",
                           ok == streams and streams > 0)
                self.limit("SSE C=1000: memory the open streams add ≤ 3 × nginx's", added, 3, " ×", 1)

    def big_section(self) -> None:
        sc = "5"
        if not self.params(sc):
            return
        self._hdr("5. one large streamed answer, read slowly (64 KiB every few ms)",
                  f"  {'':<7} {'target':<9} {'ok':>4} {'seconds':>8} {'RSS before MB':>14} {'peak MB':>9} "
                  f"{'growth MB':>16} {'CPU s':>7} {'other% P/L':>11}")
        for param in self.params(sc):
            for t in self.targets(sc, param):
                oks = self.get(sc, param, t, "ok")
                self.out(f"  {param:<7} {t:<11} {'yes' if oks and all(oks) else 'NO':>4} "
                         f"{fmt(med(self.get(sc, param, t, 'seconds')), 1):>8} "
                         f"{fmt(med(self.get(sc, param, t, 'rss_base_mb')), 1):>14} "
                         f"{fmt(med(self.get(sc, param, t, 'rss_peak_mb')), 1):>9} "
                         f"{span(self.get(sc, param, t, 'growth_mb'), 2):>16} "
                         f"{fmt(med(self.get(sc, param, t, 'cpu_s')), 2):>7} "
                         f"{self.other(sc, param, t):>11}")
            growth = self.get(sc, param, "shipped", "growth_mb")
            oks = self.get(sc, param, "shipped", "ok")
            self.check(f"{param} stream read slowly: peak RSS growth ≤ 10 MB",
                       f"{fmt(max(growth, default=float('nan')), 2)} MB (worst round)"
                       + ("" if oks and all(oks) else ", STREAM INCOMPLETE"),
                       (max(growth) <= 10 and all(oks)) if growth else None)

    def tls_section(self) -> None:
        sc = "6"
        if not self.params(sc):
            return
        self._hdr("6. HTTPS with keep-alive vs plain HTTP (cache miss)",
                  f"  {'':<7} {'target':<14} {'req/s':>26} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} "
                  f"{'CPU µs/req':>20} {'CPU%':>5} {'other% P/L':>11}")
        for param in self.params(sc):
            for t in self.targets(sc, param):
                self._wrk_row(sc, param, t, width=14)
            g = self.paired(sc, param, "shipped https", "shipped http", "rps")
            n = self.paired(sc, param, "nginx https", "nginx http", "rps")
            self.out(f"  {param:<7} ratios         https/http req/s: shipped {span(g, 2)}, nginx {span(n, 2)}")

    def errors_check(self) -> None:
        """No errors anywhere, for either gateway configuration."""
        errs = 0
        broken = 0
        for x in self.r:
            if x.target.split()[0] in GW:
                errs += int(x.m.get("errors", 0) or 0)
                if "streams" in x.m:
                    broken += int(x.m["streams"]) - int(x.m.get("ok", 0))
                if x.m.get("ok") is False:
                    broken += 1
        if self.r:
            self.check("no errors anywhere (shipped and stripped)", f"{errs} errors, {broken} broken streams",
                       errs == 0 and broken == 0)

    def bars(self) -> dict[str, dict[str, float]]:
        """For the chart: median CPU µs/request per scenario and target, and c=1 latency."""
        out: dict[str, dict[str, float]] = {}
        for sc, param in (("1", "c=50"), ("1", "c=500"), ("1", "c=1000"), ("2", "c=500"), ("7", "c=1")):
            label = {"1": "miss", "2": "hit", "7": "c=1"}[sc] + (f" {param}" if sc == "1" else "")
            row = {t: med(self.get(sc, param, t, "cpu_us")) for t in self.targets(sc, param) if t != "direct"}
            if row:
                out[f"CPU µs/req: {label}"] = row
        for key in ("p50_ms", "p99_ms"):
            row = {t: med(self.get("7", "c=1", t, key)) * 1000 for t in self.targets("7", "c=1")}
            if row:
                out[f"c=1 latency {key[:3]} µs"] = row
        return out
