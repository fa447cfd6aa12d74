"""The routing benchmark runs end to end on a tiny workload (scripts/bench-routing, tools/routing_bench)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.live.procs import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_tiny_run_fills_the_table(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    argv = [sys.executable, "-m", "tools.routing_bench", "--users", "4", "--groups", "2", "--system-tokens", "64",
            "--rounds", "2", "--question-tokens", "8", "--answer-tokens", "8", "--think-ms", "0",
            "--prefill-us", "10", "--decode-ms", "1", "--targets", "direct,ntonix,reference",
            "--policies", "round_robin", "--gateway-workers", "1", "--out", str(report)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in report.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| target")}
    assert list(rows) == ["direct", "ntonix round_robin w1", "reference"]
    for cells in rows.values():
        assert sum(int(n) for n in cells[8].split("/")) == 8  # 4 users × 2 rounds over 4 backends
        assert cells[11] == "0"  # no failures
        assert int(cells[1].replace(",", "")) > 0  # backends computed prefill tokens
    assert "SKIP  prefix at 1 worker(s)" in report.read_text()
