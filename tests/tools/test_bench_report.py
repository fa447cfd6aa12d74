"""The bench's pure parts: wrk's summary, the table's target check, the chart's data, nginx's
configuration, the profile summary and the gateway's as-shipped environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tools.bench import chart, meter, nginx, wrk
from tools.bench.profile import summarize_profile
from tools.bench.report import Result, Table
from tools.bench.run import STRIPPED, gateway_env, parse_args


def run(sc: str, param: str, target: str, rnd: int = 0, **m: Any) -> Result:
    return Result(sc, param, target, rnd, {"errors": 0, **m})


def checks(results: list[Result]) -> dict[str, tuple[str, bool | None]]:
    table = Table(results)
    table.render()
    return {name: (shown, ok) for name, shown, ok in table.checks}


def test_wrk_summary_line_is_parsed_into_figures() -> None:
    out = ("Running 1s test\nBENCH_JSON {\"requests\":500,\"duration_us\":2000000,\"bytes\":1,\"connect\":0,"
           "\"read\":1,\"write\":0,\"status\":2,\"timeout\":0,\"p50_us\":1500,\"p90_us\":1,\"p99_us\":9000,"
           "\"max_us\":12000}\n")
    w = wrk.parse_done(out)
    assert w is not None
    f = wrk.figures(w)
    assert f["rps"] == 250 and f["p50_ms"] == 1.5 and f["p99_ms"] == 9
    assert f["errors"] == 3 and f["errors_detail"] == {"read": 1, "status": 2}
    assert wrk.parse_done("no summary") is None
    assert "function delay()" in wrk.lua_script(True) and "function delay()" not in wrk.lua_script(False)


def test_target_check_uses_same_round_ratios_of_the_shipped_gateway() -> None:
    results = []
    for rnd in range(3):
        results += [run("1", "c=500", "shipped", rnd, cpu_us=400.0 + rnd, p50_ms=10.0, p99_ms=30.0),
                    run("1", "c=500", "stripped", rnd, cpu_us=300.0, p50_ms=8.0, p99_ms=20.0),
                    run("1", "c=500", "floor", rnd, cpu_us=200.0, p50_ms=1.0, p99_ms=900.0)]
    c = checks(results)
    assert c["cache miss CPU ≤ 2.5 × floor (c=500)"] == ("2.00 ×", True)
    assert c["as shipped ≤ 1.2 × stripped on a miss (c=500)"] == ("1.34 ×", False)
    assert c["cache miss at c=500: p99 ≤ 4 × p50"] == ("3.00 ×", True)
    assert c["no errors anywhere (shipped and stripped)"] == ("0 errors, 0 broken streams", True)


def test_latency_sse_and_hit_checks() -> None:
    results = [run("7", "c=1", "direct", p50_ms=0.10, p99_ms=0.50),
               run("7", "c=1", "shipped", p50_ms=0.50, p99_ms=1.00, cpu_us=700.0),
               run("4", "C=1000", "direct", streams=10, ok=10, ttft_p99_ms=2.0),
               run("4", "C=1000", "shipped", streams=10, ok=9, ttft_p99_ms=5.0, added_mb=40.0,
                   file_mb=10.0, streams_mb=30.0),
               run("4", "C=1000", "nginx", streams=10, ok=10, ttft_p99_ms=3.0, added_mb=7.5,
                   file_mb=0.0, streams_mb=7.5),
               run("2", "c=500", "shipped", cpu_us=250.0, hit_checked="HIT"),
               run("2", "c=500", "floor", cpu_us=200.0)]
    c = checks(results)
    assert c["c=1: added latency p50 ≤ 0.3 ms"] == ("0.400 ms", False)
    assert c["c=1: added latency p99 ≤ 1 ms"] == ("0.500 ms", True)
    assert c["SSE C=1000: every stream intact"] == ("9/10 byte-identical", False)
    assert c["SSE C=1000: memory the open streams add ≤ 3 × nginx's"] == ("4.0 ×", False)
    assert c["cache hit CPU ≤ 1.3 × floor (c=500)"] == ("1.25 × (X-Cache: HIT)", True)
    assert c["no errors anywhere (shipped and stripped)"] == ("0 errors, 1 broken streams", False)


def test_chart_panels_order_targets_and_leave_out_missing_figures() -> None:
    results = [run("1", "c=50", t, cpu_us=v) for t, v in (("nginx", 20.0), ("floor", 150.0), ("shipped", 500.0),
                                                            ("stripped", float("nan")))]
    assert chart.panels(results) == [("CPU µs/req: miss c=50", [("shipped", 500.0), ("floor", 150.0),
                                                                 ("nginx", 20.0)])]


def test_chart_is_drawn_as_png(tmp_path: Path) -> None:
    out = tmp_path / "chart.png"
    said = chart.draw([run("1", "c=50", "shipped", cpu_us=500.0), run("1", "c=50", "floor", cpu_us=150.0)], out)
    assert said == f"chart: {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gateway_env_sets_only_backends_ports_workers_unless_stripped() -> None:
    shipped = gateway_env("shipped", [9001, 9002], 8080, 1)
    assert shipped == {"NTONIX_BACKENDS": "127.0.0.1:9001,127.0.0.1:9002", "NTONIX_PORT": "8080",
                       "NTONIX_SSL_PORT": "0", "NTONIX_WORKERS": "1", "NTONIX_SERVER_HOST": "127.0.0.1"}
    stripped = gateway_env(STRIPPED, [9001], 8080, 1)
    assert stripped["NTONIX_CACHE_ENABLED"] == "false" and stripped["NTONIX_LOGGING_ACCESS_LOG"] == "false"


def test_nginx_conf_caches_only_when_asked(tmp_path: Path) -> None:
    plain = nginx.nginx_conf(tmp_path, 8080, [9001, 9002], cache=False, ssl_port=0, cert_dir=None,
                             worker_connections=100)
    assert "server 127.0.0.1:9001;" in plain and "server 127.0.0.1:9002;" in plain
    assert "proxy_buffering off;" in plain and "proxy_cache " not in plain
    cached = nginx.nginx_conf(tmp_path, 8080, [9001], cache=True, ssl_port=8443, cert_dir=tmp_path,
                              worker_connections=100)
    assert "proxy_cache bench;" in cached and "listen 127.0.0.1:8443 ssl" in cached


def test_profile_summary_merges_lines_and_groups_by_package() -> None:
    raw = ("main (gunicorn/x.py:1);send (gevent/_socketcommon.py:10) 3\n"
           "main (gunicorn/x.py:2);send (gevent/_socketcommon.py:11) 1\n"
           "main (gunicorn/x.py:1);handle (ntonix/gateway/proxy.py:5) 4\n")
    text = summarize_profile(raw)
    assert "8 samples" in text
    assert "50.0%  handle (ntonix/gateway/proxy.py)" in text
    assert "50.0%  send (gevent/_socketcommon.py)" in text
    assert "50.0%  ntonix" in text and "50.0%  gevent" in text


def test_baseline_rows_get_a_same_round_ratio_and_no_target_check(tmp_path: Path) -> None:
    results = [run("1", "c=50", "shipped", r, cpu_us=300.0, p50_ms=1.0, p99_ms=2.0) for r in range(2)]
    results += [run("1", "c=50", "baseline", r, cpu_us=400.0, p50_ms=1.0, p99_ms=2.0, errors=5) for r in range(2)]
    table = Table(results)
    text = table.render()
    assert "shipped/baseline CPU 0.75 (0.75–0.75)" in text
    assert ("no errors anywhere (shipped and stripped)", "0 errors, 0 broken streams", True) in table.checks


def test_baseline_must_be_a_checkout(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--baseline", str(tmp_path)])
    (tmp_path / "ntonix").mkdir()
    (tmp_path / "ntonix" / "wsgi.py").write_text("")
    assert parse_args(["--baseline", str(tmp_path), "--quick"]).baseline == str(tmp_path)


def test_the_floors_split_the_gateway_cost_into_the_stacks_and_ours() -> None:
    cpu = {"shipped": 300.0, "cache floor": 250.0, "proxy floor": 200.0, "floor": 100.0}
    results = [run("1", "c=500", t, r, cpu_us=us, p50_ms=1.0, p99_ms=2.0) for t, us in cpu.items() for r in range(2)]
    text = Table(results).render()
    assert "shipped/proxy floor CPU 1.50 (1.50–1.50)" in text  # the stack's own proxy, apart from ours
    assert "floor/proxy floor CPU 0.50 (0.50–0.50)" in text
    assert "shipped/cache floor CPU 1.20 (1.20–1.20)" in text  # ours above the least the defaults need
    assert "cache floor/proxy floor CPU 1.25 (1.25–1.25)" in text  # the stack's own cost of the defaults
    assert [t for t, _ in chart.panels(results)[0][1]] == ["shipped", "cache floor", "proxy floor", "floor"]
    assert set(chart.ORDER) == set(chart.COLOURS)


def test_with_redis_adds_the_gateway_as_shipped_with_redis_and_its_ratio_to_the_one_without() -> None:
    from tools.bench.run import SHIPPED_REDIS

    env = gateway_env(SHIPPED_REDIS, [9001], 8080, 1, redis_url="redis://127.0.0.1:6399/0")
    assert env["NTONIX_CACHE_REDIS_URL"] == "redis://127.0.0.1:6399/0"
    assert "NTONIX_CACHE_ENABLED" not in env and "NTONIX_LOGGING_ACCESS_LOG" not in env  # as shipped
    with pytest.raises(ValueError):
        gateway_env(SHIPPED_REDIS, [9001], 8080, 1)
    results = [run("1", "c=50", t, r, cpu_us=v, p50_ms=1.0, p99_ms=2.0)
               for r in range(2) for t, v in (("shipped", 300.0), (SHIPPED_REDIS, 330.0))]
    assert "shipped+redis/shipped CPU 1.10 (1.10–1.10)" in Table(results).render()
    assert parse_args(["--with-redis", "redis://127.0.0.1:6399/0"]).with_redis == "redis://127.0.0.1:6399/0"


def test_file_share_counts_only_the_growth_of_file_pages_as_the_stores() -> None:
    mib = 2**20
    # 40 MiB added at the peak, 12 of them file-backed (the LMDB store's pages): 28 the rest.
    assert meter.file_share((100 * mib, 30 * mib), (140 * mib, 42 * mib)) == (12 * mib, 28 * mib)
    # Fewer file pages than before (reclaimed) count as none; never more than was added.
    assert meter.file_share((100 * mib, 30 * mib), (108 * mib, 20 * mib)) == (0, 8 * mib)
    assert meter.file_share((100 * mib, 30 * mib), (104 * mib, 40 * mib)) == (4 * mib, 0)
