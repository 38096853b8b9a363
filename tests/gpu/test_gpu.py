"""The kernels on CuPy (issue 6): skipped unless ``kernels.backend.cupy_or_none()``
finds a CUDA device.

* closed form: one stratum, large n -- the adjusted effect's posterior is the
  conjugate normal (as ``tests/unit/kernels/test_kernels_closed_form.py``, on the GPU);
* arrival block: KS of the GPU's logit-p draws against the quadrature CDF and
  the population moments (``tests/unit/kernels/test_arrival.py``, fewer cases);
* CPU vs GPU: (1) the same random numbers (drawn on the host, copied to each
  device) give the same chain to ~1e-9 over a few sweeps -- the arithmetic of
  every block agrees; (2) independent runs on the same data give posterior
  means of the adjusted effect that agree within Monte Carlo error
  (``streams.bench.sampler.agreement``);
* Philox (``kernels.philox``, the GPU's default RNG): the same counters and
  keys give bit-identical words on cupy and numpy, the same uniforms, and
  normals/gammas/Poissons equal to rounding; whole sweeps on the GPU and the
  CPU with Philox give the same chains to ~1e-9; the memory-budgeted chunks of
  ``bench sampler`` leave every problem's draws unchanged.

Run on a GPU machine with ``pytest -m gpu`` (``tests/gpu/device_check.sh``).
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels.backend import cupy_or_none, to_numpy
from kernels.rng import Rng


def _skip_reason() -> str:
    try:
        import cupy
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken CUDA install
        return f"CuPy not installed ({type(e).__name__}: {e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001
        return f"no CUDA device (CuPy {cupy.__version__}: {type(e).__name__}: {e})"
    return f"no CUDA device (CuPy {cupy.__version__} sees {n})"


cp = cupy_or_none()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(cp is None, reason=cp is None and _skip_reason() or "")]


def _sample(data, seed: int, xp, chains: int = 4, warmup: int = 200, draws: int = 1500):
    from kernels.gibbs import init
    from kernels.sampler import run

    rng = Rng(seed, xp=xp)
    state = init(data, rng, chains)
    state, _, _ = run(state, data, rng, warmup, thin=warmup)
    state, trace, _ = run(state, data, rng, draws)
    return state, trace


# ------------------------------------------------------------------ (a) closed form

@pytest.mark.parametrize("n_units", [2_000, 10_000_000])
def test_gpu_one_stratum_matches_conjugate(n_units):
    from tests.support.kernel_helpers import one_stratum_conjugate

    data, want_mean, want_sd = one_stratum_conjugate(n_units, xp=cp)
    assert type(data.n).__module__.startswith("cupy")
    _, tr = _sample(data, seed=11, xp=cp)
    eff = to_numpy(tr.adj_effect)[0, :, :, 0].ravel()
    mcse = want_sd / np.sqrt(len(eff) / 5)
    assert abs(eff.mean() - want_mean) < 4 * mcse
    assert eff.std() == pytest.approx(want_sd, rel=0.08)
    np.testing.assert_allclose(to_numpy(tr.naive_effect), to_numpy(tr.adj_effect))


# ------------------------------------------------------------------ (b) arrival block

ARRIVAL_CASES = [(1, 10), (2, 1_000), (5, 1_000_000), (30, 10), (30, 1_000_000)]
DRAWS = 20_000


@pytest.fixture(scope="module")
def gpu_arrival_draws():
    from kernels.arrival import draw_logit_p, draw_population
    from kernels.data import make_data
    from tests.support.kernel_helpers import truncated_geometric_sum

    rng = np.random.default_rng(7)
    p_true, p_prior = 0.05, 0.08
    rows = [(D, n, truncated_geometric_sum(n, p_true, D, rng)) for D, n in ARRIVAL_CASES]
    P = len(rows)
    data = make_data(np.zeros((P, 2, 1)), np.zeros((P, 2, 1)), np.zeros((P, 2, 1)),
                     np.array([[r[1]] for r in rows], float),
                     np.array([[r[2]] for r in rows], float),
                     np.array([r[0] for r in rows], float), np.full((P, 1), 28 * p_prior),
                     xp=cp)
    r = Rng(99, xp=cp)
    x = draw_logit_p(data.grid, r, DRAWS)
    pop = draw_population(x, data.arrived, data.D, r)
    return rows, to_numpy(data.logit_p0), to_numpy(x)[:, :, 0], to_numpy(pop)[:, :, 0]


@pytest.mark.parametrize("i", range(len(ARRIVAL_CASES)),
                         ids=[f"D{D}-n{n}" for D, n in ARRIVAL_CASES])
def test_gpu_logit_p_matches_quadrature(gpu_arrival_draws, i):
    from scipy import integrate, stats

    from tests.support.kernel_helpers import numeric_posterior

    rows, logit_p0, x, _ = gpu_arrival_draws
    D, n, T = rows[i]
    dens, Z, lo, hi, _mode = numeric_posterior(n, T, D, float(logit_p0[i, 0]), 0.5)
    grid = np.linspace(lo, hi, 200_001)
    cdf_vals = integrate.cumulative_simpson(dens(grid), x=grid, initial=0.0) / Z
    ks = stats.kstest(x[i], lambda v: np.interp(v, grid, cdf_vals))
    assert ks.pvalue > 1e-3, (D, n, ks)


@pytest.mark.parametrize("i", range(len(ARRIVAL_CASES)),
                         ids=[f"D{D}-n{n}" for D, n in ARRIVAL_CASES])
def test_gpu_population_mean_matches_quadrature(gpu_arrival_draws, i):
    from scipy import integrate, special

    from tests.support.kernel_helpers import numeric_posterior

    rows, logit_p0, _, pop = gpu_arrival_draws
    D, n, T = rows[i]
    dens, Z, lo, hi, mode = numeric_posterior(n, T, D, float(logit_p0[i, 0]), 0.5)

    def q(x):
        return -np.expm1(D * np.log1p(-special.expit(x)))

    EN = integrate.quad(lambda x: n / q(x) * dens(x), lo, hi, points=[mode], limit=500)[0] / Z
    EN2 = integrate.quad(lambda x: (n * (1 - q(x)) / q(x) ** 2 + (n / q(x)) ** 2) * dens(x),
                         lo, hi, points=[mode], limit=500)[0] / Z
    sdN = np.sqrt(max(EN2 - EN**2, 0.0))
    assert abs(pop[i].mean() - EN) < 5 * sdN / np.sqrt(DRAWS) + 1e-9 * EN
    assert pop[i].std() == pytest.approx(sdN, rel=0.05, abs=1e-6 * EN)


# ------------------------------------------------------------------ (c) CPU vs GPU

class HostRng(Rng):
    """The same random numbers on either device: drawn by numpy on the host
    (parameters copied back first), then copied to the device of ``xp``."""

    def __init__(self, seed: int, xp):
        self.xp = xp
        self.kind = "host"
        self._ph = None
        self._h = np.random.default_rng(seed)

    def normal(self, shape):
        return self.xp.asarray(self._h.standard_normal(shape))

    def uniform(self, shape):
        return self.xp.asarray(self._h.random(shape))

    def gamma(self, shape_param):
        return self.xp.asarray(self._h.standard_gamma(to_numpy(shape_param)))

    def poisson(self, lam):
        return self.xp.asarray(self._h.poisson(to_numpy(lam)))


def _bench_data(P: int, S: int, xp):
    from streams.bench.sampler import model_data, synthetic_problems

    return model_data(synthetic_problems(P, S, seed=1), xp)


def test_same_draws_same_chain_on_cpu_and_gpu():
    from kernels.estimands import estimands
    from kernels.gibbs import init, sweep

    P, S, C = 12, 8, 4
    dn, dc = _bench_data(P, S, np), _bench_data(P, S, cp)
    np.testing.assert_allclose(to_numpy(dc.grid.cdf), dn.grid.cdf, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(to_numpy(dc.grid.x), dn.grid.x, rtol=1e-9, atol=1e-12)
    rn, rc = HostRng(5, np), HostRng(5, cp)
    sn, sc = init(dn, rn, C), init(dc, rc, C)
    for _ in range(3):
        sn, sc = sweep(sn, dn, rn)[0], sweep(sc, dc, rc)[0]
    for name, a in sn.arrays().items():
        np.testing.assert_allclose(to_numpy(getattr(sc, name)), a, rtol=1e-7, atol=1e-9,
                                   err_msg=name)
    en, ec = estimands(sn, dn), estimands(sc, dc)
    np.testing.assert_allclose(to_numpy(ec.adj_effect), en.adj_effect, rtol=1e-7, atol=1e-9)


def test_posterior_means_agree_cpu_vs_gpu():
    from streams.bench.sampler import agreement

    P, S = 20, 8
    _, tn = _sample(_bench_data(P, S, np), seed=21, xp=np, chains=8, warmup=150, draws=400)
    _, tc = _sample(_bench_data(P, S, cp), seed=22, xp=cp, chains=8, warmup=150, draws=400)
    ag = agreement(to_numpy(tn.adj_effect)[..., 0], to_numpy(tc.adj_effect)[..., 0])
    assert ag["agree"], ag
    assert 0.8 < ag["sd_ratio_median"] < 1.25, ag


# ------------------------------------------------------------------ (d) Philox


@pytest.mark.parametrize("rounds", [7, 10])
def test_philox_words_identical_on_cupy_and_numpy(rounds):
    """The fused cupy kernel, the array code on cupy and the array code on
    numpy: the same words; the fused kernel is the one in use."""
    from kernels import philox
    from kernels.philox import philox4x32, philox4x32_arrays, philox4x64

    rng = np.random.default_rng(0)
    ctr = rng.integers(0, 2**32, size=(4, 100_000), dtype=np.uint64)
    key = rng.integers(0, 2**32, size=(2, 100_000), dtype=np.uint64)
    want = philox4x32(*ctr, *key, rounds=rounds)
    dev = [cp.asarray(c) for c in ctr] + [cp.asarray(k) for k in key]
    assert philox._fused_philox(rounds) is not None, "fused kernel did not build"
    for got in (philox4x32(*dev, rounds=rounds), philox4x32_arrays(*dev, rounds=rounds)):
        for g, w in zip(got, want, strict=True):
            assert type(g).__module__.startswith("cupy")
            np.testing.assert_array_equal(to_numpy(g), w)
    # broadcasting as the sampler calls it: [P, 1] keys against [1, n] counters
    b = philox4x32(dev[0][None, :50], dev[1][None, :50], 3, 5, dev[4][:6, None],
                   dev[5][:6, None], rounds=rounds)
    w = philox4x32(ctr[0][None, :50], ctr[1][None, :50], 3, 5, key[0][:6, None],
                   key[1][:6, None], rounds=rounds)
    for g, x in zip(b, w, strict=True):
        np.testing.assert_array_equal(to_numpy(g), x)
    ctr64 = rng.integers(0, 2**64, size=(4, 1000), dtype=np.uint64)
    key64 = rng.integers(0, 2**64, size=(2, 1000), dtype=np.uint64)
    want = philox4x64(*ctr64, *key64)
    got = philox4x64(*(cp.asarray(c) for c in ctr64), *(cp.asarray(k) for k in key64))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(to_numpy(g), w)


def test_philox_draws_match_on_cupy_and_numpy():
    """Same keys and call sequence: uniforms bit-identical; transcendental-based
    draws equal to a few ulps (the GPU's log/cos differ in the last bit); the
    rejection samplers' integer/accept decisions identical."""
    from kernels.philox import keys_for

    P = 7
    keys = keys_for(3, range(100, 100 + P))
    rn = Rng(3, xp=np, kind="philox", keys=keys)
    rc = Rng(3, xp=cp, kind="philox", keys=keys)
    assert Rng(3, xp=cp).kind == "philox"  # the GPU default
    for r in (rn, rc):
        r.begin_sweep(np.arange(P) * 3)
    np.testing.assert_array_equal(to_numpy(rc.uniform((P, 8, 2, 8))), rn.uniform((P, 8, 2, 8)))
    np.testing.assert_allclose(to_numpy(rc.normal((P, 8, 8))), rn.normal((P, 8, 8)),
                               rtol=1e-13, atol=1e-13)
    a = np.broadcast_to(np.geomspace(0.05, 1e6, 64), (P, 8, 64)).copy()
    np.testing.assert_allclose(to_numpy(rc.gamma(cp.asarray(a))), rn.gamma(a), rtol=1e-11)
    lam = np.broadcast_to(np.geomspace(1e-3, 1e7, 64), (P, 8, 64)).copy()
    np.testing.assert_array_equal(to_numpy(rc.poisson(cp.asarray(lam))), rn.poisson(lam))


def test_philox_sweeps_match_on_cupy_and_numpy():
    """init + 3 sweeps through ``kernels.sampler.run`` with Philox on each
    device, no host round trip of the random numbers: the same chains."""
    from kernels.estimands import estimands
    from kernels.gibbs import init
    from kernels.philox import keys_for
    from kernels.sampler import run

    P, S, C = 12, 8, 4
    dn, dc = _bench_data(P, S, np), _bench_data(P, S, cp)
    keys = keys_for(5, range(P))
    rn = Rng(5, xp=np, kind="philox", keys=keys)
    rc = Rng(5, xp=cp, kind="philox", keys=keys)
    sn, sc = init(dn, rn, C), init(dc, rc, C)
    sn, _, _ = run(sn, dn, rn, 3)
    sc, _, _ = run(sc, dc, rc, 3)
    for name, a in sn.arrays().items():
        np.testing.assert_allclose(to_numpy(getattr(sc, name)), a, rtol=1e-7, atol=1e-9,
                                   err_msg=name)
    en, ec = estimands(sn, dn), estimands(sc, dc)
    np.testing.assert_allclose(to_numpy(ec.adj_effect), en.adj_effect, rtol=1e-7, atol=1e-9)


def test_gpu_chunks_do_not_change_the_draws():
    from streams.bench.sampler import bench_gibbs_chunked, chunk_problems, synthetic_problems

    st = synthetic_problems(9, 8, seed=2)
    a = bench_gibbs_chunked(st, cp, 4, 5, 10)
    b = bench_gibbs_chunked(st, cp, 4, 5, 10, chunk=4)
    assert a.stats["rng"] == "philox" and b.stats["chunks"] == 3
    np.testing.assert_allclose(b.adj_effect, a.adj_effect, rtol=1e-9, atol=1e-12)
    # the device check's P = 100,000 row: a chunk that fits, and not a tiny one
    n = chunk_problems(100_000, 8, 2, 8, 200, cp)
    assert 1000 <= n <= 100_000, n


# ------------------------------------------------------------------ (e) fused kernels


def test_fused_kernels_on_device_equal_numpy_blocks():
    """``kernels/cuda/sweep.cu`` through cupy.RawModule (tests/unit/kernels/test_fused.py checks
    the same source built as C): the ω step and the arrival draw on the device
    against the NumPy blocks, the same uniforms; the decisions identical, the
    values to the last bits of the device's log/exp."""
    from kernels import fused, gibbs
    from kernels.arrival import draw_logit_p
    from tests.support.kernel_helpers import ListRng, omega_inputs, random_data, rel

    assert fused.enabled(cp)
    for P, C, K1, S in [(40, 4, 2, 1), (25, 3, 3, 7), (20, 8, 2, 8), (10, 2, 3, 17)]:
        data = random_data(100 + S, P, K1, S)
        c, resid, v, omega2, u_x, u_acc = omega_inputs(data, C, seed=S)
        with np.errstate(divide="ignore", invalid="ignore"):
            want = gibbs._draw_omega2(omega2, resid, v, c["has"], c, ListRng(u_x, u_acc))
        d = cp.asarray
        got = to_numpy(fused.omega_step(
            d(resid), d(v), d(c["has"]), d(omega2), d(u_x), d(u_acc), d(c["omega_grid_om2"]),
            d(c["omega_grid_prior"]), d(c["omega_u0"]), d(c["omega_log_A"]), c["omega_nu"],
            c["omega_step"]))
        np.testing.assert_array_equal(got == omega2, want == omega2, err_msg=f"S={S}")
        assert rel(got, want).max() <= 1e-11, (S, rel(got, want).max())
    for P, C, S in [(30, 8, 1), (20, 5, 7), (10, 3, 12)]:
        data = random_data(200 + S, P, 2, S)
        u = np.random.default_rng(S).random((P, C, S))
        want = draw_logit_p(data.grid, ListRng(u), C)
        g = data.grid
        got = to_numpy(fused.arrival_draw(cp.asarray(u), cp.asarray(g.cdf), cp.asarray(g.x),
                                          cp.asarray(g.logw)))
        assert rel(got, want).max() <= 1e-11, (S, rel(got, want).max())


def test_sweeps_fused_equal_unfused_on_device(monkeypatch):
    """init + 5 sweeps on the GPU with Philox, LIFTSTREAM_FUSED=1 against =0 and
    against the NumPy path: the same chains (the same draws, the arithmetic equal
    to rounding)."""
    from kernels.gibbs import init
    from kernels.philox import keys_for
    from kernels.sampler import run

    P, S, C = 12, 8, 4
    keys = keys_for(5, range(P))
    out = {}
    for mode, xp in (("1", cp), ("0", cp), ("cpu", np)):
        monkeypatch.setenv("LIFTSTREAM_FUSED", "0" if mode == "0" else "1")
        data = _bench_data(P, S, xp)
        rng = Rng(5, xp=xp, kind="philox", keys=keys)
        state = init(data, rng, C)
        out[mode], _, _ = run(state, data, rng, 5)
    for name, a in out["cpu"].arrays().items():
        for mode in ("1", "0"):
            np.testing.assert_allclose(to_numpy(getattr(out[mode], name)), a, rtol=1e-7,
                                       atol=1e-9, err_msg=f"{name} fused={mode}")
