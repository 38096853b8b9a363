"""The optional compiled build (``streams.native``, issue 25): the compiled build of each module
of ``MODULES`` (the rules ``streams.state.semantics``, the tail sketch ``kernels.tail``, unit
records ``streams.state.unit_records``, the RESP packer ``streams.state.resp``: tested against
hiredis in test_resp.py) gives exactly
what its pure-Python source gives, and the loader runs a binary only when it was built from the
sources on disk.

The suite itself runs on whichever implementation the import got (the compiled one after
``make install`` with a C compiler, as on CI); the differential test below runs the ``.py`` beside
it. ``LIFTSTREAM_REQUIRE_NATIVE=1`` (.ci/run) turns "no compiled build" from a skip into a
failure, so CI cannot pass on the fallback alone without saying so."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import struct
import sys

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels.tail as tail
import streams.native as native
import streams.state.partition_store as partition_store
import streams.state.resp as resp
import streams.state.semantics as semantics
import streams.state.unit_records as unit_records
from schemas.records import ExperimentConfig, Exposure, Metric, MetricSpec
from streams.state.store import advance_partition, apply_source_batch, claim_partition, event_row
from tests.integration.test_state_differential import T0, TOPIC, configs, raw_streams, src

REQUIRED = os.environ.get("LIFTSTREAM_REQUIRE_NATIVE", "") not in ("", "0")


def compiled(mod) -> bool:
    """Whether the import got the compiled build of ``mod`` (a module of ``MODULES``)."""
    return not mod.__file__.endswith(".py")


COMPILED = compiled(semantics)


def needs_compiled(mod):
    """Skip where ``mod`` runs as pure Python, unless CI requires the build (then it fails)."""
    return pytest.mark.skipif(not compiled(mod) and not REQUIRED,
                              reason=f"{mod.__name__} is {native.status()[mod.__name__]}")


def test_compiled_build_in_use_where_required():
    """Where CI requires it, the suite really ran on the compiled build of every module."""
    if not REQUIRED:
        pytest.skip("LIFTSTREAM_REQUIRE_NATIVE is not set")
    assert all(why.startswith("compiled") for why in native.status().values()), native.status()


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
    elif type(a).__module__.endswith("__pure"):  # a class of a compiled module
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
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        return (type(e).__name__, str(e))


@needs_compiled(semantics)
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


@needs_compiled(semantics)
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


# ---------------------------------------------------------------- the tail sketch (kernels.tail)


@needs_compiled(tail)
@settings(max_examples=300, deadline=None)
@given(totals=st.lists(st.floats(allow_nan=True, allow_infinity=True)
                       | st.floats(-1e-8, 1e-8) | st.integers(-10**6, 10**6), max_size=40),
       q=st.floats(0, 1), share=st.floats(0, 1))
def test_compiled_tail_sketch_equals_pure_python(totals, q, share):
    """Buckets, bucket values, quantiles, shares, summaries: the same, floats bit for bit."""
    pure = native.pure_module(tail.__name__)
    counts: dict[int, int] = {}
    for t in totals:
        b = _outcome(lambda t=t: pure.tail_bucket(t))  # an infinite total: OverflowError
        _same(b, _outcome(lambda t=t: tail.tail_bucket(t)), f"tail_bucket({t!r})")
        if isinstance(b, int):
            _same(_outcome(lambda b=b: pure.bucket_value(b)),
                  _outcome(lambda b=b: tail.bucket_value(b)), f"bucket_value({b})")
            counts[b] = counts.get(b, 0) + 1
    sum_y2 = math.fsum(float(t) ** 2 for t in totals if math.isfinite(t) and abs(t) < 1e150)
    _same(pure.merge(counts, {1: -1}), tail.merge(counts, {1: -1}), "merge")
    _same(pure.quantile(counts, q), tail.quantile(counts, q), "quantile")
    _same(_outcome(lambda: pure.top_share(counts, sum_y2, share)),
          _outcome(lambda: tail.top_share(counts, sum_y2, share)), "top_share")
    _same(_outcome(lambda: pure.tail_summary(counts, sum_y2)),
          _outcome(lambda: tail.tail_summary(counts, sum_y2)), "tail_summary")


# ---------------------------------------------------------------- unit records


@st.composite
def units_of(draw, cfg: ExperimentConfig) -> dict:
    """Units as the rules leave them: every record version (1, 2 with pre values, 3 with
    exposure-age bins), clean and dirty, and now and then a variant the config lacks."""
    m = len(cfg.event_metrics)
    nb = draw(st.integers(1, 3))
    floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
    out = {}
    for i in range(draw(st.integers(0, 8))):
        variant = draw(st.sampled_from([*cfg.variants, *cfg.variants, "zz"]))
        u = semantics.UnitState(variant, draw(st.integers(0, 5)), draw(st.integers(-5, 10**6)),
                                draw(st.integers(T0 - 10**6, T0 + 10**9)),
                                draw(st.lists(floats, min_size=m, max_size=m)),
                                draw(st.booleans()),
                                draw(st.lists(st.none() | floats, min_size=m, max_size=m)),
                                draw(st.integers(0, 4)),
                                draw(st.sampled_from([[], [[0.0] * nb] * m]))
                                if draw(st.booleans()) else
                                draw(st.lists(st.lists(floats, min_size=nb, max_size=nb),
                                              min_size=m, max_size=m)) if m else [],
                                draw(st.booleans()))
        out[f"u{i}"] = u
    return out


@needs_compiled(unit_records)
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_compiled_unit_records_equal_pure_python(data):
    """``encode_units`` / ``encode_unit`` (the owner's commit) and ``decode_unit`` (its reads):
    the same bytes, the same error, the same decoded units."""
    pure = native.pure_module(unit_records.__name__)
    cfg = data.draw(configs(), label="configs")[0]
    units = data.draw(units_of(cfg), label="units")
    want = _outcome(lambda: pure.encode_units(units, cfg))
    got = _outcome(lambda: unit_records.encode_units(units, cfg))
    _same(want, got, "encode_units")
    for uid, u in units.items():
        rec = _outcome(lambda u=u: pure.encode_unit(u, cfg))
        _same(rec, _outcome(lambda u=u: unit_records.encode_unit(u, cfg)), f"encode_unit {uid}")
        if isinstance(rec, bytes):
            _same(vars_of(pure.decode_unit(rec, cfg)),
                  vars_of(unit_records.decode_unit(rec, cfg)), f"decode_unit {uid}")


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), n_metrics=st.integers(1, 5), age_bins=st.booleans())
def test_encode_units_is_encode_unit_of_each_dirty_unit(data, n_metrics, age_bins):
    """``encode_units`` (its version-1 records packed by ``semantics.pack_dirty_units``, with
    a call of fixed arity for 1-3 totals and star-args past that) gives byte for byte what
    ``encode_unit`` gives each dirty unit, in ``units``' order, or the same error: for 1-5
    event metrics, every record version, with and without exposure-age bins; the pure
    ``pack_dirty_units`` gives the same as the import's (compiled or not)."""
    cfg = ExperimentConfig(experiment_id="e1", variants=("c", "t1", "t2"),
                           metrics=tuple(MetricSpec(f"m{i}") for i in range(n_metrics)),
                           exposure_age_bins=(0, 10, 30) if age_bins else None)
    for _ in range(3):  # later batches: the records' Structs are known by then
        _check_encode_units(data.draw(units_of(cfg), label="units"), cfg)


def _check_encode_units(units: dict, cfg: ExperimentConfig) -> None:
    pure = native.pure_module(unit_records.__name__)
    pure_sem = native.pure_module(semantics.__name__)
    want = _outcome(lambda: {uid: pure.encode_unit(u, cfg)
                             for uid, u in units.items() if u.dirty})
    _same(want, _outcome(lambda: unit_records.encode_units(units, cfg)), "encode_units")
    _same(want, _outcome(lambda: pure.encode_units(units, cfg)), "pure encode_units")
    vix = {v: i for i, v in enumerate(cfg.variants)}
    packs = {m: s.pack for m, s in unit_records._UNIT1.items()}
    _same(want, _outcome(lambda: pure_sem.pack_dirty_units(
        units, vix, packs, lambda u: pure.encode_unit(u, cfg))), "pure pack_dirty_units")


def vars_of(u) -> dict:
    """A unit's fields (``UnitState`` is a compiled class: no ``__dict__``)."""
    return {f.name: getattr(u, f.name) for f in dataclasses.fields(u)}


# ------------------------------------------------- the owner's commit (partition_store)


@contextlib.contextmanager
def _owner_module(mod):
    """``store``'s calls into the owner (imported where they run) get ``mod`` meanwhile."""
    name = partition_store.__name__
    saved = sys.modules[name]
    sys.modules[name] = mod
    try:
        yield
    finally:
        sys.modules[name] = saved


def _redis_state(r) -> dict:
    """Every key of ``r`` but the routing index's (``lr:{x:``, written by ``store`` with
    wall-clock bucket names, not by the owner): its serialized value (``DUMP``: type,
    encoding and contents) and whether it expires."""
    return {k: (r.dump(k), r.pttl(k) > 0) for k in sorted(r.keys())
            if not k.startswith(b"lr:{x:")}


@needs_compiled(partition_store)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_compiled_owner_commit_equals_pure_python(redis_url, data):
    """The fenced owner's batches (``apply_rows_owned``: its unit cache, pending copy,
    sightings, commit), run by the pure ``.py`` on one Redis database and by the compiled
    build on another, on the same adversarial streams (``test_state_differential``'s
    generators, partitions interleaved, idle advances): the same results, the same dead
    letters and the same Redis contents, key by key, after every call."""
    pure = native.pure_module(partition_store.__name__)
    cfgs = data.draw(configs(), label="configs")
    known = {c.experiment_id: c for c in cfgs}
    n_parts = data.draw(st.integers(1, 3), label="partitions")
    per = {p: data.draw(raw_streams(cfgs, p, n_parts), label=f"events p{p}")
           for p in range(n_parts)}
    hold = data.draw(st.sampled_from([86_400, 2, 10]), label="unit hold s")
    base = redis_url.rsplit("/", 1)[0]  # (the URL's database wins over ``db=``)
    runs = [(mod, redis.Redis.from_url(f"{base}/{db}"), []) for mod, db in
            ((pure, 1), (partition_store, 2))]
    for _, r, _ in runs:
        r.flushdb()
    epochs = [{p: claim_partition(r, TOPIC, p) for p in per} for _, r, _ in runs]
    offsets = dict.fromkeys(per, 0)
    try:
        while any(per.values()):
            p = data.draw(st.sampled_from([q for q in per if per[q]]))
            k = data.draw(st.integers(1, len(per[p])))
            evs, per[p] = per[p][:k], per[p][k:]
            rows = [event_row(offsets[p] + i, ev) for i, ev in enumerate(evs)]
            offsets[p] += len(evs)
            clock = (T0 + data.draw(st.integers(0, 60_000))
                     if data.draw(st.integers(0, 5)) == 0 else None)
            outs = []
            for (mod, r, rejected), ep in zip(runs, epochs, strict=True):
                with _owner_module(mod):
                    out = _outcome(lambda r=r, rejected=rejected, ep=ep: apply_source_batch(
                        r, known, TOPIC, p, rows, hold, rejected=rejected,  # noqa: B023
                        epoch=ep[p]))  # noqa: B023
                    if clock is not None:
                        out = (out, advance_partition(r, cfgs, TOPIC, p, clock, hold,
                                                      epoch=ep[p], rejected=rejected))
                outs.append((out, list(rejected), _redis_state(r)))
            (want, want_dl, want_r), (got, got_dl, got_r) = outs
            assert want == got and want_dl == got_dl, (want, got, want_dl, got_dl)
            assert list(want_r) == list(got_r), (list(want_r), list(got_r))
            for key, v in want_r.items():
                assert v == got_r[key], (key, v, got_r[key])
    finally:
        for mod, r, _ in runs:
            for p in offsets:
                mod.forget_owner(r, TOPIC, p)
            r.close()


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


@pytest.mark.parametrize("mod", [semantics, tail, unit_records, resp, partition_store],
                         ids=lambda m: m.__name__)
def test_status_says_which_implementation_runs(mod):
    want = "compiled (mypyc" if compiled(mod) else "pure Python"
    assert native.status()[mod.__name__].startswith(want)
    assert (mod.__name__ + native.LIB_SUFFIX in sys.modules) == compiled(mod)


def test_every_compiled_module_is_tested_here():
    """A module added to ``MODULES`` gets its differential test in this file."""
    # (the packer's differential test, against hiredis itself, is test_resp.py's)
    assert set(native.MODULES) == {m.__name__ for m in (semantics, tail, unit_records, resp,
                                                        partition_store)}


def test_the_hashed_dependencies_are_the_modules_imports():
    """A build is keyed by its module and the project modules it imports (mypyc may have used
    their types and constants): a new import in the module must be listed in ``MODULES``."""
    import ast

    for module, deps in native.MODULES.items():
        tree = ast.parse(native.source_path(module).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module and n.module.split(".")[0] in ("schemas", "kernels", "streams")}
        # ``from streams.state import keys``: the module imported is ``streams.state.keys``
        pkgs = {m for m in imported if not native.source_path(m).is_file()}
        imported = (imported - pkgs) | {f"{n.module}.{a.name}" for n in ast.walk(tree)
                                        if isinstance(n, ast.ImportFrom) and n.module in pkgs
                                        for a in n.names}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names if a.name.split(".")[0] in ("schemas", "kernels", "streams")}
        assert imported == set(deps), (module, imported)
