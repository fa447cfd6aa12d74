"""The tools' shared helpers: nearest-rank percentiles, NaN-skipping medians, /proc parsing."""

from __future__ import annotations

import math
import os

from tools import procs
from tools.stats import fmt, med, percentile, span

NAN = float("nan")


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7
    assert math.isnan(percentile([], 50))


def test_median_and_span_skip_nan() -> None:
    assert med([3.0, NAN, 1.0, 2.0]) == 2
    assert math.isnan(med([NAN]))
    assert span([1.0, 3.0, 2.0, NAN]) == "2 (1–3)"
    assert span([1234.5], 1) == "1,234.5"
    assert span([NAN]) == "-"
    assert fmt(NAN) == "-"
    assert fmt(1234.567, 2) == "1,234.57"


def test_parse_stat_handles_spaces_and_parentheses_in_the_command() -> None:
    raw = "4242 (gunicorn: worker (x) [y]) S 4241 4242 4242 0 -1 4194560 1 0 0 0 17 5 0 0 20 0 1 0 99"
    fields = procs.parse_stat(raw)
    assert fields[0] == "S"
    assert fields[1] == "4241"  # ppid
    assert (fields[11], fields[12]) == ("17", "5")  # utime, stime


def test_descend_lists_parents_before_children() -> None:
    kids = {1: [10], 10: [12, 11], 11: [13], 99: [100]}
    assert procs.descend(10, kids) == [10, 11, 12, 13]
    assert procs.descend(100, kids) == [100]


def test_parse_status_rss_and_cpu_busy() -> None:
    assert procs.parse_status_rss("Name:\tx\nVmRSS:\t 2048 kB\nRssAnon:\t 512 kB\n") == (2048, 512)
    assert procs.parse_status_rss("VmRSS:\t 100 kB\n") == (100, 100)
    assert procs.parse_status_rss("Name:\tkthread\n") is None
    stat = "cpu  9 9 9 9 9 9 9 9\ncpu0 1 2 3 100 50 4 5 6 0 0\ncpu1 10 0 0 0 0 0 0 0\nintr 5\n"
    assert procs.parse_cpu_busy(stat) == {0: 1 + 2 + 3 + 4 + 5 + 6, 1: 10}


def test_this_process_tree_and_cpu_are_read_from_proc() -> None:
    assert os.getpid() in procs.tree(os.getppid())
    assert procs.cpu_seconds([os.getpid()]) > 0
    assert procs.rss_bytes([os.getpid()]) > 0
    assert procs.free_port() > 0


def test_clean_env_drops_the_gateway_settings_of_the_caller() -> None:
    os.environ["NTONIX_PORT"] = "1"
    try:
        env = procs.clean_env(EXTRA="x")
    finally:
        del os.environ["NTONIX_PORT"]
    assert "NTONIX_PORT" not in env
    assert env["EXTRA"] == "x" and env["PYTHONUNBUFFERED"] == "1"


def test_status_fields_of_this_process() -> None:
    parts = procs.status_kib(os.getpid(), ("RssAnon", "RssFile", "VmRSS"))
    assert set(parts) == {"RssAnon", "RssFile", "VmRSS"}
    assert parts["RssAnon"] > 0 and parts["RssAnon"] + parts["RssFile"] <= parts["VmRSS"]
    assert procs.status_kib(2**22 + 1, ("RssAnon",)) == {}  # above pid_max: no such process
