"""Summaries of py-spy's raw (collapsed) stacks: self and inclusive time per function and package."""

from __future__ import annotations


def _package(frame: str) -> str:
    """The package a py-spy frame ``func (path/file.py:line)`` belongs to."""
    path = frame[frame.rfind("(") + 1:].rstrip(")")
    top = path.split("/")[0].split(".")[0]
    if top in ("ntonix", "gunicorn", "gevent", "geventhttpclient", "orjson", "lmdb", "xxhash", "prometheus_client",
               "pythonjsonlogger", "greenlet"):
        return top
    return "native/other" if "/" not in path and ".py" not in path else "stdlib"


def summarize_profile(raw: str, top: int = 25) -> str:
    """Self and inclusive sample shares per function (lines merged), and self time per package."""
    self_s: dict[str, int] = {}
    incl: dict[str, int] = {}
    pkg: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if "(gevent/threadpool.py" in stack:
            continue  # gevent's resolver thread, idle in a timed wait that py-spy counts as busy
        n = int(count)
        total += n
        frames = [re_line(f) for f in stack.split(";")]
        self_s[frames[-1]] = self_s.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        p = _package(frames[-1])
        pkg[p] = pkg.get(p, 0) + n
    if not total:
        return "no samples"
    out = [f"{total} samples of the worker's main thread (py-spy, 200 Hz, idle excluded)", "",
           "self time by package:"]
    out += [f"  {v / total * 100:5.1f}%  {k}" for k, v in sorted(pkg.items(), key=lambda kv: -kv[1])]
    out += ["", f"top {top} functions by self time:"]
    out += [f"  {v / total * 100:5.1f}%  {k}" for k, v in sorted(self_s.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", f"top {top} functions by inclusive time:"]
    out += [f"  {v / total * 100:5.1f}%  {k}" for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out)


def re_line(frame: str) -> str:
    """``f (path.py:123)`` -> ``f (path.py)``: merge a function's lines."""
    i = frame.rfind(":")
    return frame[:i] + ")" if i > frame.rfind("(") >= 0 else frame

