"""The optional compiled rules (``streams.native``, issue 25): the compiled build of
``streams.state.semantics`` gives exactly what its pure-Python source gives, and the loader runs a
binary only when it was built from the sources on disk.

The suite itself runs on whichever implementation the import got (the compiled one after
``make install`` with a C compiler, as on CI); the differential test below runs the ``.py`` beside
it. ``LIFTSTREAM_REQUIRE_NATIVE=1`` (.ci/run) turns "no compiled build" from a skip into a
failure, so CI cannot pass on the fallback alone without saying so."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import struct
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streams.native as native
import streams.state.semantics as semantics
from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from tests.integration.test_state_differential import T0, configs, raw_streams, src

COMPILED = not semantics.__file__.endswith(".py")
REQUIRED = os.environ.get("LIFTSTREAM_REQUIRE_NATIVE", "") not in ("", "0")
needs_compiled = pytest.mark.skipif(
    not COMPILED and not REQUIRED,
    reason=f"streams.state.semantics is {native.status()['streams.state.semantics']}")


def test_compiled_build_in_use_where_required():
    """Where CI requires it, the suite really ran on the compiled build."""
    if not REQUIRED:
        pytest.skip("LIFTSTREAM_REQUIRE_NATIVE is not set")
    assert COMPILED, native.status()


def _same(a, b, path: str = "") -> None:
    """``a`` (pure) and ``b`` (compiled) hold the same values, floats bit for bit, dicts in the
    same order (later iteration depends on it), objects attribute by attribute."""
    if isinstance(a, float):
        assert isinstance(b, float) and struct.pack("<d", a) == struct.pack("<d", b), (path, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b))
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, (set, frozenset)):
        assert sorted(a) == sorted(b), (path, a, b)
    elif type(a).__module__ == semantics.__name__ + "__pure":  # a class of the rules
        assert type(b).__name__ == type(a).__name__, (path, a, b)
        names = ([f.name for f in dataclasses.fields(a)] if dataclasses.is_dataclass(a)
                 else list(vars(a)))
        for n in names:
            _same(getattr(a, n), getattr(b, n), f"{path}.{n}")
    elif hasattr(a, "__dict__") and not dataclasses.is_dataclass(a):  # RetiredFilter & co
        _same(vars(a), vars(b), path)
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def _outcome(f):
    """What calling ``f`` gives: its value, or its exception's type and message."""
    try:
        return f()
    except (ValueError, TypeError, KeyError) as e:
        return (type(e).__name__, str(e))


@needs_compiled
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_compiled_rules_equal_pure_python(data):
    """Adversarial streams on several partitions (stragglers, re-sends, unknowns, metric kinds,
    age bins, holds, retirement: ``test_state_differential``'s generators) through the pure
    ``.py`` and the compiled build, batch by batch: the same categories and the same whole state
    after every call, floats bit for bit, and the same snapshots at the end."""
    pure = native.pure_module(semantics.__name__)
    cfgs = data.draw(configs(), label="configs")
    n_parts = data.draw(st.integers(1, 3), label="partitions")
    streams = {p: data.draw(raw_streams(cfgs, p, n_parts), label=f"stream {p}")
               for p in range(n_parts)}
    rnd = random.Random(data.draw(st.integers(0, 2**32), label="batching"))
    kw = dict(hold_seconds=data.draw(st.integers(0, 8)), hold_max=data.draw(st.integers(0, 3)),
              fold_limit=data.draw(st.sampled_from([1, 3, semantics.FOLD_LIMIT])))
    want, got = pure.Reducer(cfgs, **kw), semantics.Reducer(cfgs, **kw)
    cursors = dict.fromkeys(streams, 0)
    while any(cursors[p] < len(streams[p]) for p in streams):
        p = rnd.choice([q for q in streams if cursors[q] < len(streams[q])])
        n = rnd.randint(1, 6)
        batch, cursors[p] = streams[p][cursors[p]:cursors[p] + n], cursors[p] + n
        _same(_outcome(lambda: want.apply_batch(src(p), batch)),  # noqa: B023 - called at once
              _outcome(lambda: got.apply_batch(src(p), batch)), "categories")  # noqa: B023
        _same(want, got, "reducer")
    for p in streams:  # idle partitions advance on the wall clock: everything matures
        end = max((ev.ts for ev in streams[p]), default=0) + 10**8
        want.advance(src(p), end)
        got.advance(src(p), end)
    _same(want, got, "reducer")
    _same(want.snapshots(), got.snapshots(), "snapshots")


@needs_compiled
def test_compiled_rules_raise_as_pure_python():
    """A non-finite value is refused the same way by both (the ``_finite`` checks)."""
    pure = native.pure_module(semantics.__name__)
    cfg = ExperimentConfig(experiment_id="e1", metrics=(MetricSpec("rev"),))
    x = Exposure("x1", "e1", "u0", cfg.variants[0], T0)
    ev = Metric("m1", "u0", "rev", math.inf, T0 + 1, "e1")
    outs = []
    for mod in (pure, semantics):
        r = mod.Reducer([cfg])
        r.apply_batch(src(0), [x])
        outs.append(_outcome(lambda r=r: r.apply_batch(src(0), [ev])))
    assert outs[0] == outs[1] and outs[0][0] == "ValueError", outs


# ---------------------------------------------------------------- the loader (no compiler needed)


@pytest.fixture()
def fake_root(tmp_path, monkeypatch):
    """A checkout in ``tmp_path`` with the sources of ``MODULES`` and a fake build of them."""
    for m in (name for mod, deps in native.MODULES.items() for name in (mod, *deps)):
        dst = tmp_path.joinpath(*m.split(".")).with_suffix(".py")
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(native.source_path(m).read_bytes())
    monkeypatch.setattr(native, "ROOT", tmp_path)
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path / "build" / "mypyc")
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    monkeypatch.setattr(native, "_status", {})  # what this process imported stays as it was
    module = next(iter(native.MODULES))
    hashes = native.source_hashes(module)
    key = native.build_key(hashes)
    so = native.binary_path(module, key)
    so.parent.mkdir(parents=True)
    so.write_bytes(b"not really a binary")
    (native.BUILD_DIR / key / "BUILD.json").write_text(json.dumps({"sources": hashes}))
    return module, so


def test_a_build_of_the_current_sources_is_used(fake_root):
    module, so = fake_root
    assert native.compiled_binary(module)[0] == so


@pytest.mark.parametrize("which", ["module", "dependency"])
def test_an_edited_source_never_runs_the_old_binary(fake_root, which):
    """The stale-binary hazard: after an edit (of the module or of a module it was compiled
    against) the loader falls back to the ``.py`` until the next build."""
    module, _ = fake_root
    edited = module if which == "module" else native.MODULES[module][0]
    path = native.source_path(edited)
    path.write_text(path.read_text() + "\n# an edit\n")
    so, why = native.compiled_binary(module)
    assert so is None and why.startswith("pure Python"), why


def test_a_build_recorded_for_other_sources_is_not_used(fake_root):
    module, so = fake_root
    meta = so.parents[len(module.split(".")) - 1] / "BUILD.json"
    rec = json.loads(meta.read_text())
    rec["sources"][module] = "0" * 64
    meta.write_text(json.dumps(rec))
    assert native.compiled_binary(module)[0] is None


def test_the_env_var_forces_pure_python(fake_root, monkeypatch):
    module, _ = fake_root
    monkeypatch.setenv(native.PURE_ENV, "1")
    assert native.compiled_binary(module) == (None, f"pure Python ({native.PURE_ENV} is set)")


def test_the_finder_picks_the_py_over_a_binary_beside_it(fake_root, monkeypatch):
    """Without a matching build the finder names the ``.py`` itself, so an extension module
    left next to it (an in-place build by hand) is never imported instead."""
    module, _ = fake_root
    monkeypatch.setenv(native.PURE_ENV, "1")
    py = native.source_path(module)
    py.with_name(py.stem + ".cpython-311-x86_64-linux-gnu.so").write_bytes(b"stale")
    spec = native._Finder().find_spec(module)
    assert spec is not None and spec.origin == str(py)
    assert native._Finder().find_spec("streams.state.store") is None  # not ours: the usual way


def test_status_says_which_implementation_runs():
    want = "compiled (mypyc" if COMPILED else "pure Python"
    assert native.status()[semantics.__name__].startswith(want)
    assert (semantics.__name__ + native.LIB_SUFFIX in sys.modules) == COMPILED


def test_the_hashed_dependencies_are_the_modules_imports():
    """A build is keyed by its module and the project modules it imports (mypyc may have used
    their types and constants): a new import in the module must be listed in ``MODULES``."""
    import ast

    for module, deps in native.MODULES.items():
        tree = ast.parse(native.source_path(module).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module and n.module.split(".")[0] in ("schemas", "kernels", "streams")}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names if a.name.split(".")[0] in ("schemas", "kernels", "streams")}
        assert imported == set(deps), (module, imported)
