"""Importing a module does nothing but define things (after aiohttp's test_circular_imports.py).

Each module is imported on its own in a fresh interpreter, in an empty working directory with
its own run directory, and must leave the environment, the file system and gunicorn's module
attributes as they were, and print nothing. Entry points that run on import are left out:
``ntonix.wsgi`` builds the application from the configuration the master published.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {"ntonix.wsgi"}

CHECK = """
import os, sys
import gunicorn.util, gunicorn.http.wsgi
before_env = dict(os.environ)
before_attrs = (gunicorn.util.write_error, gunicorn.util.http_date, gunicorn.http.wsgi.Response.write)
import {module}
assert dict(os.environ) == before_env, "environment changed"
after_attrs = (gunicorn.util.write_error, gunicorn.util.http_date, gunicorn.http.wsgi.Response.write)
assert after_attrs == before_attrs, "gunicorn patched on import"
"""


def modules() -> list[str]:
    names = []
    for path in sorted((ROOT / "ntonix").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name not in ENTRY_POINTS:
            names.append(name)
    return names


def test_every_package_module_is_listed() -> None:
    assert "ntonix.server.worker" in modules() and "ntonix.server.hooks" in modules()


@pytest.mark.slow
def test_importing_a_module_has_no_side_effects(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NTONIX_", "_NTONIX_", "PROMETHEUS_"))}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path / "home"), XDG_RUNTIME_DIR=str(tmp_path / "xdg"),
               TMPDIR=str(tmp_path / "tmp"))
    for d in ("home", "xdg", "tmp", "cwd"):
        (tmp_path / d).mkdir()
    procs = {name: subprocess.Popen([sys.executable, "-W", "error", "-c", CHECK.format(module=name)],
                                    cwd=tmp_path / "cwd", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name in modules()}
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=60)
        if proc.returncode != 0 or out:
            failed[name] = f"exit {proc.returncode}: {out.decode(errors='replace')[-400:]}"
    assert not failed, "\n".join(f"{n}: {why}" for n, why in failed.items())
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.parent != tmp_path)
    assert not left, f"created on import: {left}"


def test_the_master_config_does_not_load_prometheus_client() -> None:
    """gunicorn.conf.py imports the hooks before it sets PROMETHEUS_MULTIPROC_DIR (docs/adr/0006)."""
    code = "import sys, ntonix.server.hooks; assert 'prometheus_client' not in sys.modules, 'loaded'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
