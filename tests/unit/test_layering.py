"""Layering rules (STYLE.md practice 16), read from the source with ``ast``; nothing is imported.

1. The pure core does no I/O: its modules import no network, process or thread module.
2. Only the entry points import the composition root ``ntonix.app``.

Modules of the pure core that do not exist (yet) are skipped, so the rules hold while the tree grows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ntonix"

PURE_CORE = (
    "ntonix.balancer",
    "ntonix.breaker",
    "ntonix.health",
    "ntonix.transitions",
    "ntonix.sse",
    "ntonix.cache_key",
    "ntonix.cache_entry",
    "ntonix.config",
    "ntonix.config_model",
    "ntonix.config_validate",
    "ntonix.headers",
    "ntonix.errors",
    "ntonix.gunicorn_settings",
    "ntonix.figures",
    "ntonix.backends",
    "ntonix.record",
    "ntonix.keepalive",
)

# Modules (and their submodules) the pure core must not import, directly or through another
# ntonix module. ``http`` and ``urllib`` as such are not listed: ``http.HTTPStatus`` and
# ``urllib.parse`` do no I/O. Imports under ``if TYPE_CHECKING:`` do not count.
IO_MODULES = (
    "gevent",
    "geventhttpclient",
    "socket",
    "ssl",
    "select",
    "selectors",
    "asyncio",
    "subprocess",
    "multiprocessing",
    "threading",
    "_thread",
    "urllib.request",
    "urllib.error",
    "http.client",
    "http.server",
    "requests",
    "redis",
    "lmdb",
    "gunicorn",
    "statsd",
    "prometheus_client",
)
# Exceptions to IO_MODULES: a lock is not I/O (gevent patches it into a greenlet-aware one).
ALLOWED = ("threading.Lock", "threading.RLock")

COMPOSITION_ROOT = "ntonix.app"
# Files allowed to import the composition root (relative to the repository root).
ENTRY_POINTS = frozenset({"ntonix/wsgi.py", "ntonix/__main__.py", "ntonix/worker.py", "gunicorn.conf.py"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute dotted name)`` of every import in ``path``, relative ones resolved.

    ``import a.b`` yields ``a.b``; ``from a import b`` yields ``a.b`` (``b`` may be a module or a
    name in ``a``); ``from a import *`` yields ``a``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, node.module] if node.module else base_parts)
            else:
                base = node.module or ""
            found += [(node.lineno, base if alias.name == "*" else f"{base}.{alias.name}") for alias in node.names]
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> list[ast.AST]:
    """All nodes below ``node`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    out: list[ast.AST] = []
    for child in ast.iter_child_nodes(node):
        out.append(child)
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for sub in child.orelse:
                out.append(sub)
                out += _runtime_nodes(sub)
        else:
            out += _runtime_nodes(child)
    return out


def python_files() -> list[Path]:
    files = sorted(PACKAGE.rglob("*.py"))
    extra = ROOT / "gunicorn.conf.py"
    return [*files, extra] if extra.exists() else files


def existing_core_modules() -> list[tuple[str, Path]]:
    out = []
    for name in PURE_CORE:
        rel = Path(*name.split("."))
        for candidate in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
            if candidate.exists():
                out.append((name, candidate))
    return out


def is_io(name: str) -> bool:
    if any(name == a or name.startswith(a + ".") for a in ALLOWED):
        return False
    return any(name == m or name.startswith(m + ".") for m in IO_MODULES)


def ntonix_file(name: str) -> Path | None:
    """The file of ntonix module ``name``, or of its parent when ``name`` is a name in a module."""
    for candidate in (name, name.rpartition(".")[0]):
        if candidate == "ntonix" or candidate.startswith("ntonix."):
            rel = Path(*candidate.split("."))
            for path in (ROOT / rel.with_suffix(".py"), ROOT / rel / "__init__.py"):
                if path.exists():
                    return path
    return None


def io_imports_reached(path: Path) -> list[str]:
    """Every I/O import reachable from ``path`` through ntonix modules, with the chain that reaches it."""
    problems: list[str] = []
    seen = {path}
    todo = [(path, module_name(path))]
    while todo:
        current, chain = todo.pop()
        for line, name in imported_modules(current):
            if is_io(name):
                problems.append(f"{chain} line {line}: import {name}")
                continue
            target = ntonix_file(name)
            if target is not None and target not in seen:
                seen.add(target)
                todo.append((target, f"{chain} -> {module_name(target)}"))
    return sorted(problems)


def test_package_exists() -> None:
    assert PACKAGE.is_dir(), f"{PACKAGE} missing"


CORE_MODULES = existing_core_modules()


@pytest.mark.parametrize(("name", "path"), CORE_MODULES, ids=[name for name, _ in CORE_MODULES])
def test_pure_core_imports_no_io(name: str, path: Path) -> None:
    bad = io_imports_reached(path)
    assert not bad, f"{name} is pure core (no I/O) but imports I/O modules:\n  " + "\n  ".join(bad)


def test_only_entry_points_import_the_composition_root() -> None:
    problems = []
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel in ENTRY_POINTS or module_name(path) == COMPOSITION_ROOT:
            continue
        for line, mod in imported_modules(path):
            if mod == COMPOSITION_ROOT or mod.startswith(COMPOSITION_ROOT + "."):
                problems.append(f"{rel} line {line}: import {mod}")
    assert not problems, (
        f"only {sorted(ENTRY_POINTS)} may import the composition root {COMPOSITION_ROOT}:\n  " + "\n  ".join(problems)
    )


# --- the checker itself, on synthetic files


def test_imported_modules_resolves_relative_and_from_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "ntonix"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    src = pkg / "mod.py"
    src.write_text(
        "import socket as s, os\n"
        "from . import app\n"
        "from .app import build\n"
        "from gevent.pool import Pool\n"
        "from threading import Lock\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import geventhttpclient\n"
        "else:\n"
        "    import ssl\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    mods = {m for _, m in imported_modules(src)}
    assert mods == {"socket", "os", "ntonix.app", "ntonix.app.build", "gevent.pool.Pool", "ssl", "threading.Lock",
                    "typing.TYPE_CHECKING"}


def test_io_detection() -> None:
    assert is_io("gevent.pool.Pool")
    assert is_io("socket")
    assert is_io("http.client")
    assert is_io("threading")
    assert not is_io("threading.Lock")
    assert not is_io("http.HTTPStatus")
    assert not is_io("urllib.parse.urlsplit")
    assert not is_io("sockets_of_mine")


def test_io_reached_through_another_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "ntonix"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pure.py").write_text("from ntonix.helper import thing\n")
    (pkg / "helper.py").write_text("import json\nfrom gevent import sleep\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert io_imports_reached(pkg / "pure.py") == ["ntonix.pure -> ntonix.helper line 2: import gevent.sleep"]
