"""The counter-based RNG (``kernels.philox``, ``Rng(kind="philox")``).

* the bijection: Random123's known-answer vectors for Philox4x32-7/10, and the
  same construction on 64-bit words against ``numpy.random.Philox``
  (Philox4x64-10) bit for bit; against ``randomgen``'s Philox4x32 when that
  package is installed;
* the distributions against truth: KS tests (uniform, normal, gamma),
  chi-square on the pmf (Poisson) and ``loggam`` against scipy, all with
  thresholds a wrong sampler fails (fixed seeds: the tests are deterministic);
* the point of it: a problem's draws do not change when other problems join
  or leave its batch, when the batch is padded to more strata, when its
  neighbours are at other iterations, or when a run is split into ticks --
  at the level of single draws (bit for bit) and of whole sweeps.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats

from kernels import philox
from kernels.philox import keys_for, philox4x32, philox4x64
from kernels.rng import Rng

# Random123 tests/kat_vectors: name rounds ctr[4] key[2] -> out[4]
KAT_4x32 = """
philox4x32 7 00000000 00000000 00000000 00000000 00000000 00000000 5f6fb709 0d893f64 4f121f81 4f730a48
philox4x32 7 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 5207ddc2 45165e59 4d8ee751 8c52f662
philox4x32 7 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 4dfccaba 190a87f0 c47362ba b6b5242a
philox4x32 10 00000000 00000000 00000000 00000000 00000000 00000000 6627e8d5 e169c58d bc57ac4c 9b00dbd8
philox4x32 10 ffffffff ffffffff ffffffff ffffffff ffffffff ffffffff 408f276d 41c83b0e a20bc7c6 6d5451fd
philox4x32 10 243f6a88 85a308d3 13198a2e 03707344 a4093822 299f31d0 d16cfe09 94fdcceb 5001e420 24126ea1
"""  # noqa: E501
KAT_4x64 = """
philox4x64 10 0000000000000000 0000000000000000 0000000000000000 0000000000000000 0000000000000000 0000000000000000 16554d9eca36314c db20fe9d672d0fdc d7e772cee186176b 7e68b68aec7ba23b
philox4x64 10 ffffffffffffffff ffffffffffffffff ffffffffffffffff ffffffffffffffff ffffffffffffffff ffffffffffffffff 87b092c3013fe90b 438c3c67be8d0224 9cc7d7c69cd777b6 a09caebf594f0ba0
"""  # noqa: E501


def _kat(text):
    for line in text.strip().splitlines():
        f = line.split()
        yield int(f[1]), [int(x, 16) for x in f[2:6]], [int(x, 16) for x in f[6:8]], \
            [int(x, 16) for x in f[8:12]]


@pytest.mark.parametrize("rounds,ctr,key,want", list(_kat(KAT_4x32)))
def test_philox4x32_known_answers(rounds, ctr, key, want):
    got = philox4x32(*ctr, *key, rounds=rounds)
    assert [int(w) for w in got] == want


def test_philox4x32_known_answers_batched():
    """The same vectors as one array call (broadcasting, no per-element state)."""
    rows = [r for r in _kat(KAT_4x32) if r[0] == 10]
    ctr = np.array([r[1] for r in rows], np.uint64)
    key = np.array([r[2] for r in rows], np.uint64)
    got = np.stack(philox4x32(*ctr.T, *key.T), axis=1)
    np.testing.assert_array_equal(got, np.array([r[3] for r in rows], np.uint64))


@pytest.mark.parametrize("rounds,ctr,key,want", list(_kat(KAT_4x64)))
def test_philox4x64_known_answers(rounds, ctr, key, want):
    got = philox4x64(*(np.uint64(c) for c in ctr), *(np.uint64(k) for k in key), rounds=rounds)
    assert [int(w) for w in got] == want


def test_construction_matches_numpy_philox():
    """numpy's ``Philox`` is Philox4x64-10: it adds one to its 256-bit counter
    (word 0 least significant), then emits the block's four words in order.
    Same counters and keys through ``philox4x64`` give the same words."""
    rng = np.random.default_rng(1)
    ctr = rng.integers(0, 2**64, size=(64, 4), dtype=np.uint64)
    key = rng.integers(0, 2**64, size=(64, 2), dtype=np.uint64)
    ours = np.stack(philox4x64(*ctr.T, *key.T), axis=1)
    for i in range(len(ctr)):
        c = sum(int(ctr[i, j]) << (64 * j) for j in range(4))
        k = int(key[i, 0]) | int(key[i, 1]) << 64
        bg = np.random.Philox(counter=(c - 1) % 2**256, key=k)
        np.testing.assert_array_equal(bg.random_raw(4), ours[i])


def test_philox4x32_matches_randomgen():
    randomgen = pytest.importorskip("randomgen")
    rng = np.random.default_rng(2)
    ctr = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64)
    key = rng.integers(0, 2**32, size=(64, 2), dtype=np.uint64)
    ours = np.stack(philox4x32(*ctr.T, *key.T), axis=1)
    for i in range(len(ctr)):
        c = sum(int(ctr[i, j]) << (32 * j) for j in range(4))
        k = int(key[i, 0]) | int(key[i, 1]) << 32
        bg = randomgen.Philox(counter=(c - 1) % 2**128, key=k, number=4, width=32)
        np.testing.assert_array_equal(bg.random_raw(4), ours[i])


# ------------------------------------------------------------------ numbers


def test_to_double_range_and_resolution():
    z = np.zeros(1, np.uint64)
    m = np.full(1, 0xFFFFFFFF, np.uint64)
    assert philox.to_double(z, z)[0] == 0.0
    assert philox.to_double(m, m)[0] == 1.0 - 2.0**-53
    assert philox.to_double(z, np.full(1, 64, np.uint64))[0] == 2.0**-53


def test_loggam_matches_scipy():
    """Used at k + 1 ≥ 1 (PTRS); near 0 the recurrence loses a few more digits."""
    x = np.concatenate([np.linspace(0.5, 10, 4001), np.arange(1.0, 2000.0),
                        np.geomspace(10, 1e12, 500)])
    np.testing.assert_allclose(philox.loggam(x), special.gammaln(x), rtol=2e-14, atol=2e-14)
    x = np.linspace(1e-3, 0.5, 500)
    np.testing.assert_allclose(philox.loggam(x), special.gammaln(x), rtol=1e-13)


P = 4  # problems in the distribution tests; draws are [P, n]
N = 50_000


def _rng(seed=0):
    return Rng([seed, 12], kind="philox")


def test_uniform_and_normal_ks():
    r = _rng()
    u = r.uniform((P, N)).ravel()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    z = r.normal((P, N)).ravel()
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 5 / np.sqrt(z.size) and abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    # different sites, problems and elements are not correlated
    z2 = r.normal((P, N))
    assert abs(np.corrcoef(z, z2.ravel())[0, 1]) < 5 / np.sqrt(z.size)


def test_ks_detects_a_wrong_distribution():
    """The tolerance is one a wrong sampler fails."""
    z = _rng(1).normal((P, N)).ravel()
    assert stats.kstest(z * 1.02, "norm").pvalue < 1e-3
    g = _rng(1).gamma(np.full((P, N), 2.0)).ravel()
    assert stats.kstest(g, stats.gamma(2.05).cdf).pvalue < 1e-3


GAMMA_SHAPES = [0.01, 0.2, 0.999, 1.0, 3.7, 1e3, 1e6]


@pytest.mark.parametrize("a", GAMMA_SHAPES)
def test_gamma_ks(a):
    # a seed per shape: one seed for all would transform the same normals and
    # uniforms, and the shapes' p-values would move together
    g = _rng(200 + GAMMA_SHAPES.index(a)).gamma(np.full((P, N // 2), a)).ravel()
    assert np.all(g >= 0)
    assert stats.kstest(g, stats.gamma(a).cdf).pvalue > 1e-3, a
    assert abs(g.mean() - a) < 5 * np.sqrt(a / g.size)


def test_gamma_edge_shapes_and_mixed_batch():
    r = _rng(3)
    a = np.tile(np.array([0.0, 0.5, 2.0, 1e4]), (P, 2000, 1))  # [P, 2000, 4]
    g = r.gamma(a)
    assert np.all(g[..., 0] == 0.0)
    for j, aj in enumerate([0.5, 2.0, 1e4]):
        assert stats.kstest(g[..., j + 1].ravel(), stats.gamma(aj).cdf).pvalue > 1e-3
    assert np.isnan(r.gamma(np.full((P, 3), -1.0))).all()


@pytest.mark.parametrize("lam", [1e-3, 0.3, 2.0, 9.99, 10.0, 55.5, 1e4, 1e7])
def test_poisson_chi_square(lam):
    x = _rng(4).poisson(np.full((P, N), lam)).ravel()
    assert x.dtype == np.int64 and x.min() >= 0
    lo, hi = stats.poisson.ppf(1e-4, lam), stats.poisson.ppf(1 - 1e-4, lam)
    edges = np.unique(np.round(np.linspace(lo, hi + 1, 40)))
    edges = np.concatenate([[-np.inf], edges[1:-1] - 0.5, [np.inf]])
    obs = np.histogram(x, bins=edges)[0]
    exp = np.diff(stats.poisson.cdf(np.where(np.isfinite(edges), np.floor(edges), edges), lam))
    exp = exp * x.size
    keep = exp > 5
    obs = np.append(obs[keep], obs[~keep].sum())
    exp = np.append(exp[keep], exp[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    if len(exp) > 1:
        chi2 = ((obs - exp) ** 2 / exp).sum()
        assert stats.chi2.sf(chi2, len(exp) - 1) > 1e-3, (lam, chi2, len(exp))
    assert abs(x.mean() - lam) < 5 * np.sqrt(lam / x.size)
    assert abs(x.var() / lam - 1) < 6 * np.sqrt(2 / x.size) + 6 / np.sqrt(lam * x.size)


def test_poisson_zero_and_mixed():
    lam = np.tile(np.array([0.0, 3.0, 300.0]), (P, 20_000, 1))
    x = _rng(5).poisson(lam)
    assert np.all(x[..., 0] == 0)
    for j, lj in enumerate([3.0, 300.0]):
        m = x[..., j + 1].mean()
        assert abs(m - lj) < 5 * np.sqrt(lj / x[..., j + 1].size)


# ------------------------------------------------------------------ batch invariance


def _draws(ids, iterations, S=5, sweeps=2):
    """Each draw kind of a sweep-like call sequence for the problems ``ids``."""
    r = Rng([7, 7], kind="philox", keys=keys_for([7, 7], ids))
    P = len(ids)
    out = []
    it = np.asarray(iterations)
    for _ in range(sweeps):
        r.begin_sweep(it)
        out.append(r.uniform((P, 3, S)))
        out.append(r.normal((P, 3, 2, S)))
        shape = np.broadcast_to(0.3 + np.arange(3 * S).reshape(3, S) % 7 * 10.0, (P, 3, S))
        out.append(r.gamma(shape))
        out.append(r.poisson(np.broadcast_to(np.arange(3 * S).reshape(3, S) % 5 * 4.0,
                                             (P, 3, S))))
        out.append(r.uniform((P, S, 3)))  # chains last, as the arrival block draws
        r.end_sweep()
        it = it + 1
    return out


def test_draws_of_a_problem_do_not_depend_on_its_batch():
    a = _draws([11, 12, 13], [4, 4, 4])
    b = _draws([13], [4])
    c = _draws([20, 13, 21, 22, 23], [0, 4, 9, 1, 4])  # neighbours at other iterations
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x[2], y[0])
        np.testing.assert_array_equal(x[2], z[1])
    assert not np.array_equal(a[0][0], a[0][1])  # problems differ from each other


def test_gamma_rounds_do_not_depend_on_the_batch():
    """Gamma shapes where Marsaglia–Tsang rejects often (a just above 1):
    the retried elements are drawn from their own counters, whoever else is
    in the batch."""
    a1 = np.full((3, 4000), 1.0)
    r1 = Rng(3, kind="philox", keys=keys_for(3, [1, 2, 3]))
    r2 = Rng(3, kind="philox", keys=keys_for(3, [2]))
    np.testing.assert_array_equal(r1.gamma(a1)[1], r2.gamma(a1[:1])[0])
    lam = np.full((3, 4000), 12.0)  # PTRS rejects ~10 %
    np.testing.assert_array_equal(r1.poisson(lam)[1], r2.poisson(lam[:1])[0])


def test_padding_does_not_change_existing_elements():
    r1 = Rng(5, kind="philox", keys=keys_for(5, [1, 2, 3]))
    r2 = Rng(5, kind="philox", keys=keys_for(5, [1, 2, 3]))
    x = r1.normal((3, 4, 2, 5))
    y = r2.normal((3, 4, 3, 8))  # padded to more variants and strata
    np.testing.assert_array_equal(x, y[:, :, :2, :5])


def test_iteration_and_site_change_the_draws():
    r = Rng(5, kind="philox")
    r.begin_sweep(np.array([0, 0, 0]))
    a, b = r.uniform((3, 10)), r.uniform((3, 10))
    r.begin_sweep(np.array([1, 1, 1]))
    c = r.uniform((3, 10))
    assert len({a.tobytes(), b.tobytes(), c.tobytes()}) == 3
    free = Rng(5, kind="philox")
    assert not np.array_equal(free.uniform((3, 10)), a)  # init draws are their own stream


def test_keys_from_names_and_indices():
    k = keys_for(0, ["exp1/rev", "exp2/rev", "exp1/rev"])
    assert k.shape == (3, 2) and np.array_equal(k[0], k[2]) and not np.array_equal(k[0], k[1])
    assert (k < 2**32).all()
    assert not np.array_equal(keys_for(0, ["exp1/rev"]), keys_for(1, ["exp1/rev"]))
    np.testing.assert_array_equal(keys_for(0, range(5))[3], keys_for(0, [3])[0])


def _bench(P, S=8, seed=1):
    from streams.bench.sampler import synthetic_problems

    return synthetic_problems(P, S, seed=seed)


def test_sweeps_of_a_problem_do_not_depend_on_its_batch():
    """Whole sweeps (init + 3 through ``kernels.sampler.run``): problems 2 and 4
    sampled in a batch of 6 and in a batch of their own (plus problem 0) give
    the same chains up to rounding (searchsorted over row-shifted CDFs)."""
    from kernels.gibbs import init
    from kernels.sampler import run
    from streams.bench.sampler import model_data

    st = _bench(6)
    sub = [0, 2, 4]
    full = model_data(st)
    part = model_data({k: v[sub] for k, v in st.items()})
    ra = Rng(3, kind="philox", keys=keys_for(3, range(6)))
    rb = Rng(3, kind="philox", keys=keys_for(3, sub))
    sa, sb = init(full, ra, 4), init(part, rb, 4)
    sa, ta, _ = run(sa, full, ra, 3)
    sb, tb, _ = run(sb, part, rb, 3)
    for name, arr in sa.arrays().items():
        np.testing.assert_allclose(getattr(sb, name), arr[sub], rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    np.testing.assert_allclose(tb.adj_effect, ta.adj_effect[sub], rtol=1e-9, atol=1e-12)


def test_ticks_give_the_same_draws_as_one_run():
    """Two ticks of 2 sweeps (a fresh Rng each, as ``streams.sampling.advance`` makes
    one per tick) = one run of 4: counters come from the chains' iterations."""
    from kernels.gibbs import init
    from kernels.sampler import run
    from streams.bench.sampler import model_data

    data = model_data(_bench(3))
    keys = keys_for(9, ["a/x", "b/x", "c/x"])
    r = Rng(9, kind="philox", keys=keys)
    s0 = init(data, r, 2)
    one, _, _ = run(s0, data, Rng(9, kind="philox", keys=keys), 4)
    two, _, _ = run(s0, data, Rng(9, kind="philox", keys=keys), 2)
    two, _, _ = run(two, data, Rng(9, kind="philox", keys=keys), 2)
    for name, arr in one.arrays().items():
        np.testing.assert_array_equal(getattr(two, name), arr, err_msg=name)


def test_bench_chunks_do_not_change_the_draws():
    from streams.bench.sampler import bench_gibbs_chunked, chunk_bounds

    assert chunk_bounds(8, 3) == [(0, 3), (3, 6), (6, 8)]
    st = _bench(8)
    a = bench_gibbs_chunked(st, np, 3, 5, 10, rng_kind="philox")
    b = bench_gibbs_chunked(st, np, 3, 5, 10, rng_kind="philox", chunk=3)
    assert a.stats["chunks"] == 1 and b.stats["chunks"] == 3  # the last of two problems
    np.testing.assert_allclose(b.adj_effect, a.adj_effect, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.ess, a.ess, rtol=1e-6)


def test_cpu_default_is_unchanged():
    r = Rng([0, 1])
    assert r.kind == "pcg"
    want = np.random.Generator(np.random.PCG64(np.random.SeedSequence([0, 1]))).random(5)
    np.testing.assert_array_equal(r.uniform(5), want)
    with pytest.raises(ValueError):
        Rng(0, kind="pcg", keys=keys_for(0, [1]))


def test_posterior_with_philox_agrees_with_pcg():
    """Whole chains: the sampler driven by Philox and by PCG64 gives the same
    posterior of the adjusted effect (means within Monte Carlo error,
    Bonferroni over problems; sds within 20 %)."""
    from kernels.gibbs import init
    from kernels.sampler import run
    from streams.bench.sampler import agreement, model_data

    data = model_data(_bench(12, seed=4))
    out = []
    for kind in ("pcg", "philox"):
        r = Rng([11, 1], kind=kind)
        s = init(data, r, 8)
        s, _, _ = run(s, data, r, 100, thin=100)
        _, tr, _ = run(s, data, r, 300)
        out.append(tr.adj_effect[..., 0])
    ag = agreement(out[0], out[1])
    assert ag["agree"], ag
    assert 0.8 < ag["sd_ratio_median"] < 1.25, ag


def test_draws_outside_sweeps_never_repeat():
    """Init-style draws between sweeps have their own call counter: a sweep
    resetting its site counter must not make later free draws reuse one."""
    r = Rng(8, kind="philox")
    seen = {r.uniform((3, 4)).tobytes()}
    for it in range(3):
        r.begin_sweep(np.full(3, it))
        seen.add(r.uniform((3, 4)).tobytes())
        r.end_sweep()
        seen.add(r.uniform((3, 4)).tobytes())
    assert len(seen) == 7


def test_positional_keys_follow_the_batch_size():
    r = Rng(8, kind="philox")
    a = r.uniform((3, 4))
    b = r.uniform((5, 4))  # another batch size: keys_for(seed, range(5))
    assert a.shape == (3, 4) and b.shape == (5, 4)
    fixed = Rng(8, kind="philox", keys=keys_for(8, range(3)))
    with pytest.raises(ValueError):
        fixed.uniform((5, 4))
