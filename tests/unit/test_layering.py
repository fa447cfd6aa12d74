"""Layering rules (STYLE.md practice 16), read from the source with ``ast``; nothing is imported.

1. The pure core does no I/O: ``ntonix/core/`` (every file there, by path) imports only
   ``ntonix.core``, ``ntonix.errors``, ``ntonix.config.model``, the standard library, orjson and
   xxhash; those and the other pure modules reach no network, process or thread module.
2. Only the entry point ``ntonix/wsgi.py`` imports the composition root ``ntonix.app``.
3. Each I/O library is imported by one package only (gevent by a short, explained list).
4. The request flow (``ntonix/gateway/``) and the transport seam's Protocol and fake reach no
   geventhttpclient: the flow gets its ``Transport`` from the composition root.

Imports under ``if TYPE_CHECKING:`` count everywhere. A module named below that does not exist
fails the check, so a rename cannot silently drop a module from it. Importing any module has no
side effects (test_import_side_effects.py).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ntonix"

CORE_DIR = PACKAGE / "core"
# The pure core, by path: every module of ntonix/core/ is checked whether listed or not; a listed
# one that is missing fails.
CORE = (
    "ntonix.core.attempt",
    "ntonix.core.balancer",
    "ntonix.core.breaker",
    "ntonix.core.cache_entry",
    "ntonix.core.cache_key",
    "ntonix.core.figures",
    "ntonix.core.headers",
    "ntonix.core.health",
    "ntonix.core.keepalive",
    "ntonix.core.models",
    "ntonix.core.prompt",
    "ntonix.core.record",
    "ntonix.core.redis_url",
    "ntonix.core.registry",
    "ntonix.core.routing",
    "ntonix.core.sse",
    "ntonix.core.transitions",
    "ntonix.core.usage",
)
# Pure outside core/: no I/O reached (they may read files and the environment).
PURE_ELSEWHERE = (
    "ntonix.errors",
    "ntonix.config.model",
    "ntonix.config.validate",
    "ntonix.server.settings",
)
# What a core module may import besides the standard library.
CORE_MAY_IMPORT = ("ntonix.core", "ntonix.errors", "ntonix.config.model", "orjson", "xxhash")

# Modules (and their submodules) the pure core must not import, directly or through another
# ntonix module. ``http`` and ``urllib`` as such are not listed: ``http.HTTPStatus`` and
# ``urllib.parse`` do no I/O. Imports under ``if TYPE_CHECKING:`` count too: a type-only import
# still ties the modules together and hides a cycle.
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
# Files allowed to import the composition root (relative to the repository root): gunicorn loads
# ``ntonix.wsgi`` for both ``gunicorn -c gunicorn.conf.py ntonix.wsgi`` and ``python -m ntonix``.
ENTRY_POINTS = frozenset({"ntonix/wsgi.py"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, *, type_checking: bool = True) -> list[tuple[int, str]]:
    """``(line, absolute dotted name)`` of every import in ``path``, relative ones resolved;
    those under ``if TYPE_CHECKING:`` only when ``type_checking``.

    ``import a.b`` yields ``a.b``; ``from a import b`` yields ``a.b`` (``b`` may be a module or a
    name in ``a``); ``from a import *`` yields ``a``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in (ast.walk(tree) if type_checking else _runtime_nodes(tree)):
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


def module_path(name: str) -> Path:
    """The file of module ``name`` (which may not exist)."""
    rel = Path(*name.split("."))
    package = ROOT / rel / "__init__.py"
    return package if package.exists() else ROOT / rel.with_suffix(".py")


def core_files() -> list[Path]:
    return sorted(p for p in CORE_DIR.glob("*.py") if p.name != "__init__.py")


def pure_modules() -> list[tuple[str, Path]]:
    names = sorted({*CORE, *PURE_ELSEWHERE, *(module_name(p) for p in core_files())})
    return [(name, module_path(name)) for name in names]


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


PURE_MODULES = pure_modules()


@pytest.mark.parametrize(("name", "path"), PURE_MODULES, ids=[name for name, _ in PURE_MODULES])
def test_pure_core_imports_no_io(name: str, path: Path) -> None:
    assert path.exists(), f"{name} is listed as pure but {path.relative_to(ROOT)} does not exist"
    bad = io_imports_reached(path)
    assert not bad, f"{name} is pure core (no I/O) but imports I/O modules:\n  " + "\n  ".join(bad)


def core_import_allowed(name: str) -> bool:
    top = name.partition(".")[0]
    if any(name == m or name.startswith(m + ".") for m in CORE_MAY_IMPORT):
        return True
    return top in sys.stdlib_module_names and top != "ntonix" and not is_io(name)


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.stem)
def test_core_imports_only_core_errors_config_model_and_stdlib(path: Path) -> None:
    bad = [f"line {line}: import {name}" for line, name in imported_modules(path) if not core_import_allowed(name)]
    assert not bad, f"{module_name(path)} is in ntonix/core/ but imports:\n  " + "\n  ".join(bad)


def test_listed_core_modules_are_all_in_core() -> None:
    assert {module_name(p) for p in core_files()} == set(CORE), "update CORE (and docs/architecture.md)"


# Each I/O library belongs to one package (the edge of that kind, STYLE.md practice 5).
OWNERS = {
    "geventhttpclient": ("ntonix/upstream/",),
    "lmdb": ("ntonix/cache/",),
    # Redis is also the cluster's shared state (ntonix/cluster/, ADR 0009).
    "redis": ("ntonix/cache/", "ntonix/cluster/"),
    "pylru": ("ntonix/cache/",),
    "prometheus_client": ("ntonix/telemetry/",),
    "statsd": ("ntonix/telemetry/",),
    "pythonjsonlogger": ("ntonix/telemetry/",),
    "gunicorn": ("ntonix/server/",),
    # gevent: the hub is everywhere, but greenlets and watchers belong to the edges. bodies.py
    # only subclasses GreenletExit (StreamAborted, which gunicorn's worker swallows; its
    # background greenlet is spawned by upstream/background.py), and the coalescer's default
    # sleep is gevent's (injected, tests pass their own). cluster/resp.py is the Redis wire edge:
    # its AutoPipeline's writer and reader are greenlets (used only inside gevent workers).
    "gevent": ("ntonix/upstream/", "ntonix/server/", "ntonix/gateway/bodies.py", "ntonix/cache/coalescer.py",
               "ntonix/cluster/resp.py"),
}


def test_each_io_library_is_imported_by_its_package_only() -> None:
    problems = []
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, name in imported_modules(path):
            owners = OWNERS.get(name.partition(".")[0])
            if owners is not None and not rel.startswith(owners):
                problems.append(f"{rel} line {line}: import {name} (belongs to {', '.join(owners)})")
    assert not problems, "\n  ".join(["I/O libraries outside their package:", *problems])


# The transport seam (ntonix/upstream/base.py): the request flow is handed a Transport and must
# not reach geventhttpclient, even through another module, so it runs over the scripted fake in
# unit tests; the Protocol and the fake must not reach it either.
SEAM_SIDE = ("ntonix/gateway/", "ntonix/upstream/__init__.py", "ntonix/upstream/base.py", "ntonix/upstream/fake.py")


def seam_side_files() -> list[Path]:
    return [p for p in python_files() if p.relative_to(ROOT).as_posix().startswith(SEAM_SIDE)]


@pytest.mark.parametrize("path", seam_side_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_flow_and_the_fake_reach_no_geventhttpclient(path: Path) -> None:
    bad = [p for p in io_imports_reached(path) if "import geventhttpclient" in p]
    assert not bad, "behind the Transport seam, but reaches geventhttpclient:\n  " + "\n  ".join(bad)


def test_seam_side_paths_exist() -> None:
    missing = [p for p in SEAM_SIDE if not (ROOT / p).exists()]
    assert not missing


def test_owner_paths_exist() -> None:
    missing = [p for paths in OWNERS.values() for p in paths if not (ROOT / p).exists()]
    assert not missing


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
    assert "geventhttpclient" in {m for _, m in imported_modules(src)}
    mods = {m for _, m in imported_modules(src, type_checking=False)}
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


def test_core_import_rule() -> None:
    assert core_import_allowed("ntonix.core.breaker.CircuitBreaker")
    assert core_import_allowed("ntonix.config.model.BackendConfig")
    assert core_import_allowed("collections.abc.Mapping")
    assert core_import_allowed("xxhash")
    assert not core_import_allowed("ntonix.config.load_config")  # the loader reads files and the environment
    assert not core_import_allowed("ntonix.upstream.transport")
    assert not core_import_allowed("socket")
    assert not core_import_allowed("lmdb")


# Which packages each package may import (docs/architecture.md, module map); TYPE_CHECKING included.
# The flow (gateway) sits on the edges; no edge imports the flow; nothing but wsgi.py imports app.
PACKAGE_MAY_IMPORT = {
    "core": {"core", "errors", "config.model"},
    "config": {"config", "errors", "core.redis_url"},  # the one check of cache.redis_url, shared
    "cache": {"cache", "core", "errors", "pid"},
    "cluster": {"cluster", "cache", "core", "errors", "pid"},
    "upstream": {"upstream", "core", "errors", "config"},
    "telemetry": {"telemetry", "core", "errors", "config", "pid"},
    "routing": {"routing", "core", "errors", "config.model"},
    "server": {"server", "core", "errors", "config", "upstream", "telemetry"},
    "gateway": {"gateway", "core", "errors", "config", "cache", "cluster", "routing", "upstream", "telemetry",
                "server.disconnect"},
}


def test_packages_import_only_what_the_module_map_allows() -> None:
    problems = []
    for package, allowed in PACKAGE_MAY_IMPORT.items():
        assert (PACKAGE / package).is_dir(), f"ntonix/{package}/ is missing"
        for path in sorted((PACKAGE / package).rglob("*.py")):
            for line, name in imported_modules(path):
                parts = name.split(".")
                if parts[0] != "ntonix" or len(parts) < 2:
                    continue
                target = ".".join(parts[1:])
                if not any(target == a or target.startswith(a + ".") for a in allowed):
                    problems.append(f"{path.relative_to(ROOT)} line {line}: import {name}")
    assert not problems, "imports the module map does not allow:\n  " + "\n  ".join(problems)
