"""The optional compiled build of the worker's per-event code (issue 25): one source, a
pure-Python fallback.

Each module of ``MODULES`` (the rules ``streams/state/semantics.py``, and, measured by callgrind
instructions per event, the owner's RESP packer, the tail sketch, the unit records and the
owner's batch apply ``streams/state/partition_store.py``: 70.5k -> 66.3k, -5.9%; not
``schemas/validate.py``, whose compiled attribute reads of msgspec Structs cost more than the
interpreter's specialised ones, nor the ``Ingestor``: ~0.9k instructions an event, ~1%, for ~20 s
more build and a hash over seven modules) stays the one source and the importable module. ``make
install`` (``python -m streams.native build``: ``__main__.py``) compiles it with mypyc, when a C
compiler and mypy are there, into ``build/mypyc/<key>/``: outside the package, so CPython's import
never finds a binary next to the ``.py``. ``BUILD.json`` there records the SHA-256 of every source
the binary was compiled from (the module and the project modules it imports, whose types and
constants mypyc may have used). :func:`install`, run by ``streams/__init__.py``, puts a finder
first on ``sys.meta_path`` that loads the binary only when those hashes match the files on disk
now, and the ``.py`` otherwise: a developer who edits the rules runs the edit, never an old binary,
until the next build. ``LIFTSTREAM_PURE_PYTHON=1`` forces the ``.py``.

:func:`status` says which one each module got (``liftstream bench ingest --json``'s ``native``,
the worker's startup log), so a measurement says what it measured.

Stdlib only at import: the library must import on a machine without mypy or a compiler.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

#: The modules compiled, and the project modules each one imports (hashed with it).
MODULES: dict[str, tuple[str, ...]] = {
    "streams.state.semantics": ("schemas.records", "kernels.tail", "streams.state.retired_filter"),
    "streams.state.resp": (),
    "kernels.tail": (),
    "streams.state.unit_records": ("schemas.records", "streams.state.semantics"),
    "streams.state.partition_store": (
        "schemas.records", "streams.config.settings", "streams.state.keys", "streams.state.pending",
        "streams.state.retired_filter", "streams.state.semantics", "streams.state.store",
        "streams.state.wire"),
}

#: Set to ``1`` to run every module of ``MODULES`` as pure Python.
PURE_ENV = "LIFTSTREAM_PURE_PYTHON"

ROOT = Path(__file__).resolve().parents[2]  # the checkout: streams/native/__init__.py
BUILD_DIR = ROOT / "build" / "mypyc"

#: mypyc compiles a module into a shim (``semantics.so``) and its code, which the shim imports
#: as the module's name plus this (``semantics__mypyc.so``), in the same build folder.
LIB_SUFFIX = "__mypyc"

_status: dict[str, str] = {}
_loaded: dict[str, Path] = {}


def source_path(module: str) -> Path:
    """The ``.py`` of a project module (``a.b.c`` -> ``ROOT/a/b/c.py``)."""
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def source_hashes(module: str) -> dict[str, str]:
    """SHA-256 of the module's source and of the sources it was compiled against."""
    return {m: hashlib.sha256(source_path(m).read_bytes()).hexdigest()
            for m in (module, *MODULES[module])}


def build_key(hashes: dict[str, str]) -> str:
    """The build's folder name: a digest of the sources and the interpreter's ABI."""
    h = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode())
    h.update(importlib.machinery.EXTENSION_SUFFIXES[0].encode())
    return h.hexdigest()[:16]


def binary_path(module: str, key: str) -> Path:
    """Where the build of ``module`` for ``key`` puts its extension module."""
    *pkg, name = module.split(".")
    return BUILD_DIR.joinpath(key, *pkg, name + importlib.machinery.EXTENSION_SUFFIXES[0])


def compiled_binary(module: str) -> tuple[Path | None, str]:
    """The binary built from ``module``'s current sources, or None and why not."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return None, f"pure Python ({PURE_ENV} is set)"
    try:
        hashes = source_hashes(module)
    except OSError as e:  # an installed copy without the sources: nothing to check against
        return None, f"pure Python (no source to check a build against: {e})"
    key = build_key(hashes)
    so = binary_path(module, key)
    try:
        recorded = json.loads((BUILD_DIR / key / "BUILD.json").read_text())["sources"]
    except (OSError, ValueError, KeyError):
        return None, "pure Python (no compiled build of the current source)"
    if recorded != hashes or not so.is_file():
        return None, "pure Python (the compiled build is of another source)"
    return so, f"compiled (mypyc, build/mypyc/{key})"


class _Finder(MetaPathFinder):
    """Loads each module of ``MODULES`` from its matching build, else from its ``.py``
    (explicitly: a stray extension module next to the ``.py`` is never picked)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None
                  ) -> ModuleSpec | None:
        if fullname.endswith(LIB_SUFFIX) and fullname[:-len(LIB_SUFFIX)] in _loaded:
            # the compiled module's code, which its shim imports: from the same build
            so = _loaded[fullname[:-len(LIB_SUFFIX)]].with_name(
                fullname.rsplit(".", 1)[-1] + importlib.machinery.EXTENSION_SUFFIXES[0])
            loader = importlib.machinery.ExtensionFileLoader(fullname, str(so))
            return importlib.util.spec_from_file_location(fullname, so, loader=loader)
        if fullname not in MODULES:
            return None
        so, why = compiled_binary(fullname)
        _status[fullname] = why
        if so is not None:
            _loaded[fullname] = so
            loader = importlib.machinery.ExtensionFileLoader(fullname, str(so))
            return importlib.util.spec_from_file_location(fullname, so, loader=loader)
        py = source_path(fullname)
        if not py.is_file():
            return None  # an install without sources: the ordinary import
        loader = importlib.machinery.SourceFileLoader(fullname, str(py))
        return importlib.util.spec_from_file_location(fullname, py, loader=loader)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def status() -> dict[str, str]:
    """Which implementation each module of ``MODULES`` runs as (imports them)."""
    for m in MODULES:
        importlib.import_module(m)
    return dict(_status)


def pure_module(module: str) -> ModuleType:
    """``module``'s ``.py`` imported as pure Python under ``<module>__pure``, beside whichever
    implementation ``module`` itself got: the differential test runs the two side by side."""
    name = module + "__pure"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, source_path(module))
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while it executes
        spec.loader.exec_module(mod)
    return sys.modules[name]
