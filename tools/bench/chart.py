"""The side-by-side chart of a bench run (docs/performance.png): people compare bars faster than tables.

One panel per figure (CPU µs per request for the cache miss at each concurrency, the cache hit,
one client at a time; the c = 1 latency), one bar per target: the gateway as shipped, stripped
(cache and access log off), the floor, nginx, and direct where measured. matplotlib is a
development dependency (requirements-dev.txt); without it the bench says so and draws nothing.
"""

from __future__ import annotations

from pathlib import Path

from tools.bench.report import Result, Table

ORDER = ("shipped", "baseline", "stripped", "cache floor", "proxy floor", "floor", "nginx", "direct")
COLOURS = {"shipped": "#c0392b", "baseline": "#8e44ad", "stripped": "#e67e22", "cache floor": "#b2bec3",
           "proxy floor": "#95a5a6",
           "floor": "#7f8c8d", "nginx": "#27ae60", "direct": "#2980b9"}


def panels(results: list[Result]) -> list[tuple[str, list[tuple[str, float]]]]:
    """(title, [(target, value), ...]) per panel, targets in ORDER, NaN left out (pure)."""
    out = []
    for title, row in Table(results).bars().items():
        bars = [(t, row[t]) for t in ORDER if t in row and row[t] == row[t]]
        if bars:
            out.append((title, bars))
    return out


def draw(results: list[Result], path: Path, title: str = "") -> str:
    """Write the chart to ``path``; return a line saying what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write a file
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart: matplotlib is not installed (pip install -r requirements-dev.txt); no chart drawn"
    data = panels(results)
    if not data:
        return "chart: no scenario with CPU or latency figures was run; no chart drawn"
    cols = min(3, len(data))
    rows = (len(data) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, bars) in zip(axes.flat, data, strict=False):
        labels = [t for t, _ in bars]
        values = [v for _, v in bars]
        ax.bar(labels, values, color=[COLOURS[t] for t in labels])
        ax.set_title(name, fontsize=10)
        ax.tick_params(axis="x", labelsize=8, labelrotation=25)
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.margins(y=0.15)
    for ax in list(axes.flat)[len(data):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"chart: {path}"
