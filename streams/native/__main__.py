"""``python -m streams.native build``: compile ``streams.native.MODULES`` with mypyc (``make
install`` runs it). The loader, which needs none of this, is ``streams/native/__init__.py``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from streams.native import (
    BUILD_DIR,
    MODULES,
    ROOT,
    binary_path,
    build_key,
    source_hashes,
    source_path,
    status,
)


def has_compiler() -> str | None:
    """The C compiler the build would use (sysconfig's CC, else cc/gcc/clang), or None."""
    import sysconfig

    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "").split()
    for name in (cc[:1] or []) + ["cc", "gcc", "clang"]:
        found = shutil.which(name)
        if found:
            return found
    return None


def build(module: str, force: bool = False) -> Path:
    """Compile ``module`` with mypyc into its build folder (nothing if it is there) and drop
    the older builds of it. Needs mypy (``pip install '.[native]'``) and a C compiler."""
    hashes = source_hashes(module)
    key = build_key(hashes)
    so = binary_path(module, key)
    if so.is_file() and (BUILD_DIR / key / "BUILD.json").is_file() and not force:
        return so
    import tempfile

    import mypy.version
    from mypyc.build import mypycify
    from setuptools import Distribution

    out = BUILD_DIR / key
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="liftstream-mypyc-") as tmp:
        cwd = os.getcwd()
        os.chdir(ROOT)  # mypy names the module by its path from here
        try:
            # errors only in the module compiled: its imports are read for their types
            exts = mypycify(["--follow-imports=silent", "--cache-dir", str(Path(tmp) / "cache"),
                             str(source_path(module).relative_to(ROOT))],
                            opt_level="3", target_dir=str(Path(tmp) / "c"))
            dist = Distribution({"name": "liftstream-native", "ext_modules": exts})
            cmd = dist.get_command_obj("build_ext")
            cmd.build_lib, cmd.build_temp = str(out), str(Path(tmp) / "o")
            dist.run_command("build_ext")
        finally:
            os.chdir(cwd)
    if not so.is_file():
        raise RuntimeError(f"mypyc built no {so}")
    (out / "BUILD.json").write_text(json.dumps(
        {"module": module, "sources": hashes, "mypy": mypy.version.__version__,
         "python": sys.version.split()[0]}, indent=1, sort_keys=True) + "\n")
    for old in BUILD_DIR.iterdir():  # earlier builds of this module: never used again
        meta = old / "BUILD.json"
        if old != out and meta.is_file() and json.loads(meta.read_text()).get("module") == module:
            shutil.rmtree(old, ignore_errors=True)
    return so


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """stdout and stderr, the compiler's included, into ``log`` (the build's pages of output
    are for when it fails)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def main(argv: list[str] | None = None) -> int:
    """``python -m streams.native [build [--strict] | status | cc]``: ``build`` compiles
    ``MODULES`` when it can and otherwise says one line and exits 0 (``--strict``: 1, for CI);
    ``status`` prints :func:`status` as JSON; ``cc`` exits 1 without a C compiler."""
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = args[0] if args else "status"
    if cmd == "cc":
        return 0 if has_compiler() else 1
    if cmd == "status":
        print(json.dumps(status(), indent=1))
        return 0
    if cmd != "build":
        print(main.__doc__, file=sys.stderr)
        return 2
    strict = "--strict" in args
    if not has_compiler():
        print("native: no C compiler here: the ingest rules run as pure Python")
        return 1 if strict else 0
    log = BUILD_DIR / "build.log"
    for m in MODULES:
        try:
            with _output_to(log):
                so = build(m, force="--force" in args)
        except BaseException as e:  # noqa: BLE001 - the pure-Python module still works
            if isinstance(e, KeyboardInterrupt):
                raise
            print(f"native: could not compile {m} ({type(e).__name__}: {str(e)[:200]}; "
                  f"{log.relative_to(ROOT)}): it runs as pure Python")
            return 1 if strict else 0
        print(f"native: {m} compiled ({so.parent.relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
