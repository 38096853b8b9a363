"""kernels.diagnostics against the reference implementation (ArviZ).

The estimate records publish split R-hat, bulk and tail ESS; they are only
meaningful if they are the standard quantities, so each one is compared with
``arviz.rhat(method="rank")`` / ``arviz.ess(method="bulk" | "tail")`` on fixed
draws that exercise every branch: independent and strongly autocorrelated
chains (Geyer truncation at different lags), anti-correlated chains, chains that
disagree in location or scale (R-hat > 1), ties, heavy tails, odd draw counts,
one chain, and the tiny sizes where the ESS loops barely run. Also checked: the
scipy-free special functions against scipy, and ArviZ's edge cases (NaN,
constant draws, too few draws).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.special

from kernels.diagnostics import (
    erfc,
    ess_bulk,
    ess_tail,
    ndtri,
    rank_diagnostics,
    split_rhat,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # arviz announces its refactor on import
    import arviz

RTOL = 1e-6  # the agreement we promise; measured agreement is ~1e-15


def _ar1(rng: np.random.Generator, shape: tuple[int, ...], phi: float) -> np.ndarray:
    """Stationary AR(1) chains, unit marginal variance."""
    eps = rng.standard_normal(shape)
    x = np.empty(shape)
    x[..., 0] = eps[..., 0]
    scale = np.sqrt(1.0 - phi * phi)
    for t in range(1, shape[-1]):
        x[..., t] = phi * x[..., t - 1] + scale * eps[..., t]
    return x


def _cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240611)
    return {
        "normal_4x100": rng.standard_normal((4, 100)),
        "normal_8x1000": rng.standard_normal((8, 1000)),
        "batched_3x2x8x200": rng.standard_normal((3, 2, 8, 200)),
        "ar1_phi0.9": _ar1(rng, (4, 500), 0.9),
        "ar1_phi0.99": _ar1(rng, (4, 400), 0.99),
        "ar1_phi-0.6": _ar1(rng, (4, 300), -0.6),
        "shifted_means": rng.standard_normal((4, 200)) + 0.5 * np.arange(4)[:, None],
        "different_scales": rng.standard_normal((4, 300)) * np.array([1.0, 1.0, 1.0, 3.0])[:, None],
        "ties_rounded": np.round(rng.standard_normal((4, 300)), 1),
        "ties_poisson": rng.poisson(1.0, (2, 4, 150)).astype(float),
        "cauchy": rng.standard_cauchy((4, 400)),
        "odd_draws": rng.standard_normal((4, 101)),
        "one_chain": rng.standard_normal((1, 200)),
        "tiny_2x4": rng.standard_normal((2, 4)),
        "small_3x5": rng.standard_normal((3, 5)),
        "small_3x7": rng.standard_normal((3, 7)),
    }


CASES = _cases()


def _arviz(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ArviZ's public functions on each [chains, draws] slice, stacked to [...]."""
    flat = x.reshape((-1,) + x.shape[-2:])
    lead = x.shape[:-2]
    rhat = np.array([arviz.rhat(f, method="rank") for f in flat], dtype=float)
    bulk = np.array([arviz.ess(f, method="bulk") for f in flat], dtype=float)
    tail = np.array([arviz.ess(f, method="tail") for f in flat], dtype=float)
    return rhat.reshape(lead), bulk.reshape(lead), tail.reshape(lead)


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return {name: _arviz(x) for name, x in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_arviz(name: str, reference) -> None:
    x = CASES[name]
    want_rhat, want_bulk, want_tail = reference[name]
    got = (split_rhat(x), ess_bulk(x), ess_tail(x))
    wants = (want_rhat, want_bulk, want_tail)
    for value, want, what in zip(got, wants, ("rhat", "bulk", "tail"), strict=True):
        assert value.shape == x.shape[:-2], what
        np.testing.assert_allclose(value, want, rtol=RTOL, atol=0, equal_nan=True, err_msg=what)
    # The fused entry point gives exactly the separate functions' values.
    for fused, separate in zip(rank_diagnostics(x), got, strict=True):
        np.testing.assert_array_equal(fused, separate)


def test_reference_cases_are_not_degenerate(reference) -> None:
    """The cases above really probe what they claim (else the comparison is weak)."""
    rhat, bulk, _ = reference["shifted_means"]
    assert rhat > 1.1
    rhat, _, _ = reference["different_scales"]
    assert rhat > 1.05  # only the folded (tail) R-hat sees a scale difference
    _, bulk, _ = reference["ar1_phi0.9"]
    assert bulk < 0.1 * CASES["ar1_phi0.9"].size
    _, bulk, _ = reference["ar1_phi-0.6"]
    assert bulk > CASES["ar1_phi-0.6"].size  # antithetic chains: ESS above N
    assert np.isnan(reference["one_chain"][0])  # R-hat needs two chains
    assert np.isfinite(reference["one_chain"][1])


def test_batched_equals_per_slice() -> None:
    """Batching over leading dims changes nothing, bit for bit."""
    x = CASES["batched_3x2x8x200"]
    rhat, bulk, tail = rank_diagnostics(x)
    for idx in np.ndindex(x.shape[:-2]):
        r, b, t = rank_diagnostics(x[idx])
        assert r == rhat[idx] and b == bulk[idx] and t == tail[idx]


def test_nan_draws_poison_only_their_problem() -> None:
    x = CASES["batched_3x2x8x200"].copy()
    x[1, 0, 3, 17] = np.nan
    for fn in (split_rhat, ess_bulk, ess_tail):
        out = fn(x)
        assert np.isnan(out[1, 0])
        assert np.isfinite(np.delete(out.ravel(), 2)).all()
        np.testing.assert_array_equal(out[0], fn(x[0]))


def test_constant_draws_like_arviz() -> None:
    """Constant draws: R-hat is 0/0 = nan, ESS is the number of split draws."""
    x = np.full((4, 100), 2.5)
    assert np.isnan(split_rhat(x))
    assert ess_bulk(x) == arviz.ess(x, method="bulk") == 400
    assert ess_tail(x) == arviz.ess(x, method="tail") == 400


def test_chains_stuck_at_different_values() -> None:
    """Within-chain variance 0, between > 0: R-hat is (numerically) infinite.

    ArviZ returns round-off noise of order 1e16 here, so only the order of
    magnitude is compared; the ESS values are ordinary and must match.
    """
    x = np.repeat(np.arange(4.0)[:, None], 100, axis=1)
    assert split_rhat(x) > 1e10
    assert arviz.rhat(x) > 1e10
    np.testing.assert_allclose(ess_bulk(x), arviz.ess(x, method="bulk"), rtol=RTOL)
    np.testing.assert_allclose(ess_tail(x), arviz.ess(x, method="tail"), rtol=RTOL)


def test_too_few_draws_is_nan() -> None:
    x = np.random.default_rng(3).standard_normal((2, 5, 3))
    for fn in (split_rhat, ess_bulk, ess_tail):
        out = fn(x)
        assert out.shape == (2,) and np.isnan(out).all()
    assert all(np.isnan(v).all() for v in rank_diagnostics(x))


def test_ndtri_matches_scipy() -> None:
    tails = np.logspace(-15, -1, 500)
    p = np.concatenate([tails, np.linspace(0.001, 0.999, 4001), 1.0 - tails])
    np.testing.assert_allclose(ndtri(p), scipy.special.ndtri(p), rtol=1e-12, atol=1e-15)
    assert ndtri(np.array(0.5)) == 0.0


def test_erfc_matches_scipy() -> None:
    x = np.concatenate([np.linspace(-6.0, 6.0, 4001), np.linspace(6.0, 25.0, 500)])
    np.testing.assert_allclose(erfc(x), scipy.special.erfc(x), rtol=1e-13, atol=0)
