"""The request path's metric writes straight into prometheus_client's mmap slots
(ntonix/telemetry/prometheus.py ``fast_counter``/``fast_histogram``) leave the shared files
exactly as prometheus_client's own ``inc``/``observe`` would. Multiprocess mode is chosen when
prometheus_client is first imported, so each case runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tools.procs import clean_env

_SCRIPT = r"""
import json, os, sys
from ntonix.telemetry.prometheus import Metrics, fast_counter, fast_histogram, _FastCounter, _FastHistogram
mode = sys.argv[1]
m = Metrics(os.environ["PROMETHEUS_MULTIPROC_DIR"])
if mode == "fast":
    inc, active, lat = m.hot_requests, m.hot_active, m.hot_duration
    assert isinstance(inc, _FastCounter) and isinstance(lat, _FastHistogram), (inc, lat)
    tokens = fast_counter(m.tokens.labels("m", "b", "prompt"))
    backend = m.backend("127.0.0.1:9")
    b_req, b_lat = backend.requests, backend.latency
else:
    m.backend("127.0.0.1:9")  # its children exist in both runs
    inc, active, lat = m.requests, m.requests_active, m.request_duration
    tokens = m.tokens.labels("m", "b", "prompt")
    b_req, b_lat = m.backend_requests.labels("127.0.0.1:9"), m.backend_latency.labels("127.0.0.1:9")
for i in range(200):
    inc.inc()
    active.inc()
    tokens.inc(i)
    b_req.inc()
    for x in (0.0004, 0.005, 0.0051, 0.25, 3.0, 1e9, i / 100.0):
        lat.observe(x)
        b_lat.observe(x)
    if i % 3:
        active.dec()
m.status("2xx").inc(2)
out = {}
for fam in m.collect():
    for s in fam.samples:
        if s.name != "ntonix_worker_rss_bytes":  # labelled by pid
            out[s.name + json.dumps(sorted(s.labels.items()))] = s.value
print(json.dumps(out, sort_keys=True))
"""


def _figures(tmp_path: Path, mode: str) -> dict[str, float]:
    d = tmp_path / mode
    d.mkdir()
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(d))
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, cwd=os.getcwd(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_fast_writes_leave_the_shared_files_as_prometheus_clients_own_would(tmp_path: Path) -> None:
    slow, fast = _figures(tmp_path, "slow"), _figures(tmp_path, "fast")
    assert {k: v for k, v in fast.items() if slow.get(k) != v} == {}
    assert fast == slow
    assert fast['ntonix_requests_total[]'] == 200
    assert fast['ntonix_request_duration_seconds_count[]'] == 1400
    assert sum(v for k, v in fast.items() if k.startswith("ntonix_request_duration_seconds_bucket")
               and '"+Inf"' in k) == 1400
