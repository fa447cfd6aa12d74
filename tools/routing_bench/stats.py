"""The routing benchmark's arithmetic: per-turn records → one table row → target checks. Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Turn:
    """One request as the client saw it (times in seconds)."""

    user: int
    round: int
    status: int  # 0: no HTTP answer
    ttft: float | None  # first content event; None when none came
    e2e: float
    cached_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


@dataclass(frozen=True, slots=True)
class BackendCounts:
    """One mock backend's counters over a run (from its /metrics)."""

    requests: int = 0  # served (its model)
    wrong_model: int = 0  # refused: 404 model_not_found
    prompt_tokens: int = 0
    computed_tokens: int = 0
    cached_tokens: int = 0
    peak_in_system: int = 0  # most requests it held (running and waiting) at once


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between closest ranks; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    requests: int
    failures: int
    ttft_p50: float
    ttft_p99: float
    e2e_p99: float
    prefill_tokens: int  # computed by the backends (not cached)
    prompt_tokens: int
    cached_tokens: int
    per_backend: tuple[int, ...]
    wrong_model: int
    seconds: float
    peak_per_backend: tuple[int, ...] = field(default=())

    @property
    def cached_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else math.nan

    @property
    def skew(self) -> float:
        """Requests per backend, max / min (inf when one got none)."""
        if not self.per_backend:
            return math.nan
        lo = min(self.per_backend)
        return max(self.per_backend) / lo if lo else math.inf


def summarize(label: str, turns: Sequence[Turn], backends: Sequence[BackendCounts], seconds: float) -> Row:
    ok = [t for t in turns if t.ok]
    ttfts = [t.ttft for t in ok if t.ttft is not None]
    return Row(
        label=label, requests=len(turns), failures=len(turns) - len(ok),
        ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99),
        e2e_p99=percentile([t.e2e for t in ok], 99),
        prefill_tokens=sum(b.computed_tokens for b in backends),
        prompt_tokens=sum(b.prompt_tokens for b in backends),
        cached_tokens=sum(b.cached_tokens for b in backends),
        per_backend=tuple(b.requests for b in backends),
        wrong_model=sum(b.wrong_model for b in backends), seconds=seconds,
        peak_per_backend=tuple(b.peak_in_system for b in backends),
    )


HEADER = ("target", "prefill tok", "vs RR", "cached", "TTFT p50", "TTFT p99", "vs RR", "E2E p99",
          "req/backend", "max/min", "wrong model", "failures", "time")


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:,.0f} ms"


def _ratio(value: float, base: float | None) -> str:
    return "-" if not base or math.isnan(value) or math.isnan(base) else f"{value / base:.2f}"


def table(rows: Sequence[Row], baseline: Row | None) -> str:
    """A Markdown table; ratios against ``baseline`` (round-robin)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    base_prefill = baseline.prefill_tokens if baseline else None
    base_ttft = baseline.ttft_p99 if baseline else None
    for r in rows:
        cells = (
            r.label, f"{r.prefill_tokens:,}", _ratio(r.prefill_tokens, base_prefill),
            f"{r.cached_ratio:.0%}" if not math.isnan(r.cached_ratio) else "-",
            _ms(r.ttft_p50), _ms(r.ttft_p99), _ratio(r.ttft_p99, base_ttft), _ms(r.e2e_p99),
            "/".join(str(n) for n in r.per_backend), f"{r.skew:.2f}", str(r.wrong_model), str(r.failures),
            f"{r.seconds:.1f} s",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    value: str
    ok: bool | None  # None: not measured in this run

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        return f"{verdict}  {self.name}: {self.value}"


def prefix_checks(rows: Mapping[str, Row], workers: Sequence[int]) -> list[Check]:
    """Issue #16's targets for ``prefix`` at each worker count, against ``round_robin`` and
    ``least_requests`` of the same gateway (``direct`` round-robin when the gateway's is absent)."""
    out = []
    for w in workers:
        prefix = rows.get(f"ntonix prefix w{w}")
        rr = rows.get(f"ntonix round_robin w{w}") or rows.get("direct")
        least = rows.get(f"ntonix least_requests w{w}")
        name = f"prefix at {w} worker(s)"
        if prefix is None or rr is None:
            out.append(Check(name, "not run (--policies prefix, and round_robin or direct)", None))
            continue
        prefill = prefix.prefill_tokens / rr.prefill_tokens if rr.prefill_tokens else math.nan
        ttft = prefix.ttft_p99 / rr.ttft_p99 if rr.ttft_p99 else math.nan
        out += [
            Check(f"{name}: prefill tokens ≤ 0.35 × round-robin's", f"{prefill:.2f} ×", prefill <= 0.35),
            Check(f"{name}: TTFT p99 ≤ 0.25 × round-robin's", f"{ttft:.2f} ×", ttft <= 0.25),
            Check(f"{name}: requests per backend max/min ≤ 1.5", f"{prefix.skew:.2f}", prefix.skew <= 1.5),
            Check(f"{name}: 0 failures", str(prefix.failures), prefix.failures == 0),
        ]
        if least is None:
            out.append(Check(f"{name}: TTFT p99 better than least_requests'", "least_requests not run", None))
        else:
            out.append(Check(f"{name}: TTFT p99 better than least_requests'",
                             f"{_ms(prefix.ttft_p99)} vs {_ms(least.ttft_p99)}", prefix.ttft_p99 < least.ttft_p99))
    return out


def real_checks(rows: Mapping[str, Row], workers: Sequence[int]) -> list[Check]:
    """Real llama.cpp servers: ``prefix`` must leave the servers less to prefill than round-robin."""
    out = []
    for w in workers:
        prefix = rows.get(f"ntonix prefix w{w}")
        rr = rows.get(f"ntonix round_robin w{w}") or rows.get("direct")
        name = f"real servers, prefix at {w} worker(s)"
        if prefix is None or rr is None:
            out.append(Check(name, "not run (--policies prefix, and round_robin or direct)", None))
            continue
        ratio = prefix.prefill_tokens / rr.prefill_tokens if rr.prefill_tokens else math.nan
        out += [Check(f"{name}: prefill tokens < round-robin's", f"{ratio:.2f} ×", ratio < 1.0),
                Check(f"{name}: 0 failures", str(prefix.failures), prefix.failures == 0)]
    return out


def slow_checks(rows: Mapping[str, Row], workers: Sequence[int]) -> list[Check]:
    """One backend twice as slow: ``least_requests`` must beat round-robin's TTFT p99."""
    out = []
    for w in workers:
        least, rr = rows.get(f"ntonix least_requests w{w}"), rows.get(f"ntonix round_robin w{w}")
        name = f"slow backend, {w} worker(s): least_requests TTFT p99 better than round_robin's"
        if least is None or rr is None:
            out.append(Check(name, "not run (--policies round_robin,least_requests)", None))
        else:
            out.append(Check(name, f"{_ms(least.ttft_p99)} vs {_ms(rr.ttft_p99)}", least.ttft_p99 < rr.ttft_p99))
    return out


def limit_checks(rows: Mapping[str, Row], limit: int) -> list[Check]:
    """``backends[].max_in_flight``: no backend ever held more than ``limit`` requests of the gateway's."""
    gateway = [r for label, r in rows.items() if label.startswith("ntonix ")]
    if not gateway:
        return [Check(f"max_in_flight {limit} holds", "gateway not run", None)]
    return [Check(f"max_in_flight {limit} holds ({r.label}): most requests at a backend at once",
                  "/".join(map(str, r.peak_per_backend)), max(r.peak_per_backend, default=0) <= limit)
            for r in gateway]


def model_checks(rows: Mapping[str, Row]) -> list[Check]:
    """Mixed models: no request reaches a backend that does not serve its model."""
    gateway = [r for label, r in rows.items() if label.startswith("ntonix ")]
    if not gateway:
        return [Check("model routing: 0 requests to a backend without the model", "gateway not run", None)]
    return [Check(f"model routing ({r.label}): 0 requests to a backend without the model", str(r.wrong_model),
                  r.wrong_model == 0) for r in gateway]


def l4_label(policy: str, gateways: int, workers: int) -> str:
    """The row of ``gateways`` gateways behind HAProxy (``--targets ntonix_l4``)."""
    return f"ntonix {policy} {gateways}×w{workers} via haproxy"


def l4_checks(rows: Mapping[str, Row], workers: Sequence[int], gateways: int) -> list[Check]:
    """Issue #17: ``prefix`` through ``gateways`` gateways behind the layer-4 balancer leaves the
    backends within 10 % of the prefill tokens of one gateway (same policy and workers, same run)."""
    out = []
    for w in workers:
        many, one = rows.get(l4_label("prefix", gateways, w)), rows.get(f"ntonix prefix w{w}")
        name = f"prefix through {gateways} gateways at {w} worker(s) each"
        if many is None or one is None:
            out.append(Check(name, "not run (--policies prefix --targets ntonix,ntonix_l4)", None))
            continue
        ratio = many.prefill_tokens / one.prefill_tokens if one.prefill_tokens else math.nan
        out += [Check(f"{name}: prefill tokens within 10 % of one gateway's",
                      f"{many.prefill_tokens:,} vs {one.prefill_tokens:,} = {ratio:.2f} ×", abs(ratio - 1) <= 0.10),
                Check(f"{name}: 0 failures", str(many.failures), many.failures == 0)]
    return out
