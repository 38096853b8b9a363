"""A platform-wide prior over experiments that share a metric (docs/architecture.md#the-model;
docs/method.md §7).

Model, in *standardised* units (each experiment's effect divided by the sd of
its flat-prior estimate, so every experiment has unit measurement noise and a
single (λ, ψ²) can describe experiments of any size):

    z_e = ȳ_e / sd_e ~ N(φ_e, 1)          φ_e = θ_e / sd_e     (e = 1..E)
    φ_e ~ N(λ, ψ²)
    λ ~ N(0, 1),   ψ² ~ InvGamma(a, b),   a = 2, b = 1

ȳ_e, sd_e are the posterior mean and sd of the flat-prior effect that the
per-experiment sampler already publishes (``kernels.gibbs``); summarising each
experiment by a normal likelihood is what keeps the platform level a cheap
conjugate model, and is accurate once an experiment has a few hundred units.

Why these hyperpriors. λ and ψ are in units of a standard error. λ ~ N(0, 1):
a typical effect of one standard error either way is plausible, a typical
effect of 3 is not (most experiments do not move their metric). ψ² ~ IG(2, 1):
prior mean 1 (effects spread about as much as the noise), mode 1/3, no finite
variance — a heavy right tail, so a platform whose experiments really do differ
a lot is not shrunk towards zero; and a > 1 keeps the prior density at ψ² → 0
zero, which keeps the sampler off the ψ² = 0 funnel that an IG(ε, ε) would
allow. It weighs as 2a = 4 pseudo-experiments, 2 % of 200 experiments.

Gibbs conditionals (vectorised over chains and experiments):

    φ_e | λ, ψ², z_e ~ N(m, v),   v = 1 / (1 + 1/ψ²),   m = v (z_e + λ/ψ²)
    ψ² | λ, φ        ~ IG(a + E/2, b + Σ(φ_e − λ)²/2)
    λ | ψ², φ        ~ N(M, V),   V = 1 / (1 + E/ψ²),   M = V Σφ_e/ψ²

The last two need only the sufficient statistics (E, Σφ, Σφ²), which is what the
Redis parameter server keeps (``streams.sampling.platform_prior``). One *platform
update* draws ψ² | λ then λ | ψ² from them.

Exact asynchronous Gibbs (Terenin, Simpson & Draper, AISTATS 2020). A worker
that owns experiment e draws φ' from its conditional under hyperparameters
h_s = (λ_s, ψ²_s) that it read earlier; by commit time another worker may
have moved them to h_c. Treat the stale conditional as a proposal
q(φ') = p(φ' | h_s, z_e) for a Metropolis–Hastings step whose target is the
conditional under the current values, π(φ) = p(φ | h_c, z_e):

    α = min(1, [π(φ') q(φ)] / [π(φ) q(φ')])
      = min(1, [p(φ' | h_c) p(φ | h_s)] / [p(φ | h_c) p(φ' | h_s)])

with φ the experiment's current (committed) value. With both densities normal,

    log α = ℓ_c(φ') − ℓ_c(φ) − ℓ_s(φ') + ℓ_s(φ),
    ℓ_h(x) = −(x − m_h)² / (2 v_h)      (the −½ log 2πv_h terms cancel pairwise).

When h_s = h_c the ratio is 1 and the step *is* the Gibbs update. Accepting
always (α := 1) is the uncorrected asynchronous sampler.

**When the step is exact, and why the chain's own stale values are not
enough.** For a *fixed* h_s the step is an independence-MH kernel that leaves
π invariant. A random h_s keeps that property only if h_s is independent of
the current φ_e (given the rest of the state): then the kernel is a mixture,
over h_s, of π-invariant kernels. The chain's own (λ, ψ²) of k updates ago
fail this: they were drawn from sums that contain φ_e, and φ_e has often not
changed since (it was rejected, or not yet revisited). Measured
(``liftstream bench async``, ``tests/statistical/test_platform_prior.py``): ψ² mean
0.537 ± 0.002 at k = 16 against 0.579 exact, ~20 Monte Carlo standard errors.

The fix used here: every chain c has a **pilot chain** c′, an uncorrected
asynchronous Gibbs chain over the same experiments that never reads chain c.
Workers propose chain c's φ' under the pilot's (possibly stale) (λ, ψ²) and
correct against chain c's current values. The pilot's values are a function of
the pilot's own randomness and the data only, hence independent of chain c's
state at any staleness, so the step above is exactly π-invariant; the pilot
itself may be as biased as it likes (it only shapes proposals, which the MH
ratio corrects). Two rules keep the independence: the pilot draws its own φ
with fresh random numbers (reusing chain c's proposal as the pilot's value
would let the pilot's (λ, ψ²) depend on chain c's accepted values), and one
pilot serves one chain (a pilot shared by all chains makes the chains track
it together: each stays exact, but they are no longer independent, and
between-chain diagnostics lose their meaning). Each corrected independence
step is followed by a random-walk MH step under the current values
(``random_walk_step``): an independence sampler cannot leave tails where its
proposal is narrower than its target, and a chain started at a large ψ² was
seen stuck there for 1000 sweeps without it. Cost: the platform level does
twice the work — a few conjugate draws per experiment per tick — against the
per-experiment sampler's sweeps, which it does not touch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kernels.diagnostics import erfc, ess_bulk, ndtri

Array = np.ndarray


@dataclass(frozen=True)
class HyperPrior:
    """λ ~ N(lam_mean, lam_var), ψ² ~ InvGamma(a, b); see the module docstring."""

    a: float = 2.0
    b: float = 1.0
    lam_mean: float = 0.0
    lam_var: float = 1.0


PRIOR = HyperPrior()


# --------------------------------------------------------------------------- conditionals

def theta_conditional(z: Array, lam: Array | float, psi2: Array | float) -> tuple[Array, Array]:
    """Mean and variance of φ_e | λ, ψ², z_e.

    Args: standardised estimates ``z``, ``lam`` = λ, ``psi2`` = ψ² (broadcast).
    Returns: (mean, variance) arrays.
    """
    v = 1.0 / (1.0 + 1.0 / np.asarray(psi2))
    return v * (z + np.asarray(lam) / np.asarray(psi2)), v


def draw_theta(z: Array, lam: Array | float, psi2: Array | float,
               rng: np.random.Generator) -> Array:
    """One exact draw of φ | λ, ψ², z (arguments as ``theta_conditional``; ``rng``
    a numpy Generator). Returns an array of the broadcast shape."""
    m, v = theta_conditional(z, lam, psi2)
    m, v = np.broadcast_arrays(m, v)
    return m + np.sqrt(v) * rng.standard_normal(m.shape)


def log_conditional(phi: Array, z: Array, lam: Array | float, psi2: Array | float) -> Array:
    """log p(φ | λ, ψ², z) up to a constant *in φ only* (the −½ log v term is
    omitted: it cancels in the correction ratio, which evaluates each
    conditional at two points)."""
    m, v = theta_conditional(z, lam, psi2)
    return -0.5 * (phi - m) ** 2 / v


def correction_log_ratio(phi_new: Array, phi_old: Array, z: Array,
                         stale: tuple[Array | float, Array | float],
                         current: tuple[Array | float, Array | float]) -> Array:
    """log of the exact-asynchronous-Gibbs MH ratio (module docstring):
    log p(φ'|h_c) − log p(φ|h_c) − log p(φ'|h_s) + log p(φ|h_s)."""
    lam_s, psi2_s = stale
    lam_c, psi2_c = current
    return (log_conditional(phi_new, z, lam_c, psi2_c) - log_conditional(phi_old, z, lam_c, psi2_c)
            - log_conditional(phi_new, z, lam_s, psi2_s)
            + log_conditional(phi_old, z, lam_s, psi2_s))


RW_SCALE = 2.4  # random-walk step in sds of the conditional (~44 % acceptance in 1-d)


def random_walk_step(phi: Array, z: Array, current: tuple[Array | float, Array | float],
                     eps: Array, log_u: Array) -> Array:
    """A random-walk MH step on φ targeting p(φ | h_c, z): φ + 2.4 √v_c ε,
    accepted with the ratio of the conditional at the two points.

    Why it follows the independence step: an independence sampler whose
    proposal is narrower than its target cannot leave the target's tails
    (moves inward have small ratio), and the pilot's conditional *is*
    narrower whenever the chain's ψ² is larger than the pilot's — in our runs
    a chain started at large ψ² stayed there for 1000 sweeps. The random walk
    needs no stale value and moves inward readily; being symmetric and built
    from the current h_c only (not from φ), it is an exact MH step too, so the
    composition stays π-invariant."""
    lam_c, psi2_c = current
    _, v = theta_conditional(z, lam_c, psi2_c)
    prop = phi + RW_SCALE * np.sqrt(v) * eps
    log_a = log_conditional(prop, z, lam_c, psi2_c) - log_conditional(phi, z, lam_c, psi2_c)
    return np.where(log_u < np.minimum(log_a, 0.0), prop, phi)


def platform_update(n: Array | float, s1: Array, s2: Array, lam: Array,
                    rng: np.random.Generator,
                    prior: HyperPrior = PRIOR) -> tuple[Array, Array]:
    """One platform update from the sufficient statistics n = E, s1 = Σφ,
    s2 = Σφ²: ψ² | λ, φ (inverse gamma) then λ | ψ², φ (normal).

    Σ(φ−λ)² = s2 − 2λ s1 + nλ², so no per-experiment values are needed; this is
    why any worker can do it from the parameter server's running sums.
    """
    s1, s2, lam = np.asarray(s1, float), np.asarray(s2, float), np.asarray(lam, float)
    ss = np.maximum(s2 - 2.0 * lam * s1 + n * lam * lam, 0.0)
    shape = prior.a + 0.5 * n
    psi2 = (prior.b + 0.5 * ss) / rng.gamma(shape, 1.0, size=np.shape(ss))
    prec = 1.0 / prior.lam_var + n / psi2
    mean = (prior.lam_mean / prior.lam_var + s1 / psi2) / prec
    lam_new = mean + rng.standard_normal(np.shape(mean)) / np.sqrt(prec)
    return lam_new, psi2


def shrunk_effects(ybar: Array, sd: Array, lam: Array, psi2: Array,
                   level: float = 0.95) -> list[dict[str, object]]:
    """Each experiment's effect under the platform prior, in raw units, as the
    Rao–Blackwellised mixture over hyperparameter draws (λ_j, ψ²_j):

        θ_e | data ≈ (1/J) Σ_j N(sd_e m_ej, sd_e² v_ej),
        (m_ej, v_ej) = ``theta_conditional``(ȳ_e / sd_e, λ_j, ψ²_j).

    Exact given the draws (no Monte Carlo error from φ itself). Returns per
    experiment ``{"effect": {mean, sd, lo, hi}, "p_positive"}``; the interval
    is the mixture's central ``level`` interval (bisection on its CDF)."""
    ybar, sd = np.asarray(ybar, float), np.asarray(sd, float)
    m, v = theta_conditional((ybar / sd)[:, None], np.asarray(lam)[None, :],
                             np.asarray(psi2)[None, :])
    mu, s = sd[:, None] * m, sd[:, None] * np.sqrt(v)  # [E, J]
    mean = mu.mean(1)
    var = np.maximum((s * s + mu * mu).mean(1) - mean * mean, 0.0)

    def cdf(x: Array) -> Array:  # mixture CDF at x[E]
        return (0.5 * erfc(-(x[:, None] - mu) / (s * np.sqrt(2.0)))).mean(1)

    def quantile(q: float) -> Array:
        """Safeguarded Newton on the mixture CDF: Newton steps from the normal
        approximation, bisection whenever a step leaves the bracket."""
        lo, hi = (mu - 9 * s).min(1), (mu + 9 * s).max(1)
        x = mean + float(ndtri(np.array(q))) * np.sqrt(var)
        tol = 1e-9 * s.min(1)
        for _ in range(60):
            u = (x[:, None] - mu) / s
            f = (np.exp(-0.5 * u * u) / (s * np.sqrt(2 * np.pi))).mean(1)
            err = cdf(x) - q
            lo, hi = np.where(err < 0, x, lo), np.where(err < 0, hi, x)
            nxt = x - err / np.maximum(f, 1e-300)
            nxt = np.where((nxt >= lo) & (nxt <= hi), nxt, 0.5 * (lo + hi))
            done = np.abs(nxt - x) <= tol
            x = nxt
            if done.all():
                break
        return x

    a = 0.5 * (1.0 - level)
    qlo, qhi = quantile(a), quantile(1.0 - a)
    p_pos = 1.0 - cdf(np.zeros_like(mean))
    return [{"effect": {"mean": float(mean[e]), "sd": float(np.sqrt(var[e])),
                        "lo": float(qlo[e]), "hi": float(qhi[e])},
             "p_positive": float(p_pos[e])} for e in range(mean.size)]


# --------------------------------------------------------------------------- data

@dataclass
class Synthetic:
    """E experiments with known effects drawn from a known platform prior."""

    ybar: Array  # flat-prior effect estimates (raw units)
    sd: Array  # their standard errors
    theta: Array  # true effects (raw units)
    lam: float
    psi2: float

    @property
    def z(self) -> Array:
        """The standardised estimates ȳ_e / sd_e."""
        return self.ybar / self.sd


def synthetic(n_experiments: int = 200, lam: float = 0.3, psi2: float = 0.5,
              seed: int = 0) -> Synthetic:
    """True standardised effects φ_e ~ N(lam, psi2), θ_e = sd_e φ_e with
    standard errors spread over a decade (experiments of different sizes), and
    ȳ_e ~ N(θ_e, sd_e²)."""
    rng = np.random.default_rng(seed)
    sd = 0.01 * np.exp(rng.uniform(np.log(0.3), np.log(3.0), n_experiments))
    phi = lam + np.sqrt(psi2) * rng.standard_normal(n_experiments)
    theta = sd * phi
    ybar = theta + sd * rng.standard_normal(n_experiments)
    return Synthetic(ybar, sd, theta, lam, psi2)


# --------------------------------------------------------------------------- samplers

@dataclass
class Draws:
    """Post-warm-up draws, [chains, draws(, experiments)], standardised φ."""

    lam: Array
    psi2: Array
    phi: Array
    acceptance: float = 1.0  # of the correction step (1 for synchronous / uncorrected)
    extra: dict[str, int] = field(default_factory=dict)  # e.g. version races (Redis runs)


def initial_state(z: Array, n_chains: int, rng: np.random.Generator) -> tuple[Array, Array, Array]:
    """Over-dispersed start: λ, ψ² from the hyperprior-ish range, φ from z."""
    lam = rng.normal(0.0, 1.0, n_chains)
    psi2 = np.exp(rng.normal(0.0, 1.0, n_chains))
    phi = z[None, :] + rng.standard_normal((n_chains, z.size))
    return lam, psi2, phi


def sync_gibbs(z: Array, n_sweeps: int = 2000, n_chains: int = 4, seed: int = 0,
               prior: HyperPrior = PRIOR) -> Draws:
    """Reference (i): the synchronous two-block Gibbs sampler over the joint
    model, vectorised over chains; the first half of the sweeps is warm-up."""
    rng = np.random.default_rng(seed)
    E = z.size
    lam, psi2, phi = initial_state(z, n_chains, rng)
    keep = n_sweeps - n_sweeps // 2
    out_l, out_p = np.empty((n_chains, keep)), np.empty((n_chains, keep))
    out_phi = np.empty((n_chains, keep, E))
    for t in range(n_sweeps):
        phi = draw_theta(z[None, :], lam[:, None], psi2[:, None], rng)
        lam, psi2 = platform_update(E, phi.sum(1), (phi * phi).sum(1), lam, rng, prior)
        if (j := t - n_sweeps // 2) >= 0:
            out_l[:, j], out_p[:, j], out_phi[:, j] = lam, psi2, phi
    return Draws(out_l, out_p, out_phi)


PROPOSALS = ("pilot", "own")


def async_gibbs(z: Array, n_sweeps: int = 2000, n_chains: int = 4, seed: int = 0,
                n_workers: int = 4, batch: int = 10, staleness: int = 0,
                correct: bool = True, proposal: str = "pilot",
                prior: HyperPrior = PRIOR) -> Draws:
    """(ii)/(iii): asynchronous Gibbs with injected staleness, simulated in
    one process (the Redis version is ``streams.sampling.platform_prior``).

    Experiments are dealt to ``n_workers`` workers; an *event* is one worker
    committing one batch of ``batch`` experiments, then doing a platform update
    from the current sufficient statistics. Events come from workers in random
    order (workers run at unequal speeds). Each batch is drawn under the
    hyperparameters of k platform updates ago, k ~ Uniform{0..staleness} drawn
    per batch and per chain — i.e. the worker read them k updates before it
    committed. One recorded draw per E/batch events (as many experiment
    updates as a synchronous sweep).

    ``correct=True`` is the exact sampler: proposals are drawn under the stale
    values of the chain's *pilot* (``proposal="pilot"``, module docstring) and
    accepted with the MH ratio against the chain's current values;
    ``proposal="own"`` proposes under the chain's own stale values instead
    (the construction as first specified, biased at high staleness — kept to
    measure that). ``correct=False``: own stale values, always accepted.
    """
    if proposal not in PROPOSALS:
        raise ValueError(f"proposal must be one of {PROPOSALS}, not {proposal!r}")
    rng = np.random.default_rng(seed)
    E = z.size
    pilots = correct and proposal == "pilot"
    C = 2 * n_chains if pilots else n_chains  # chains [n_chains, 2 n_chains) are pilots
    lam, psi2, phi = initial_state(z, C, rng)
    H = staleness + 1
    hist_l = np.repeat(lam[:, None], H, 1)  # ring buffer, slot (pos - k) % H = k ago
    hist_p = np.repeat(psi2[:, None], H, 1)
    pos = 0
    owners = np.array_split(np.arange(E), n_workers)
    batches = [np.array_split(o, max(1, -(-o.size // batch))) for o in owners]
    next_batch = [0] * n_workers
    per_sweep = sum(len(b) for b in batches)
    keep = n_sweeps - n_sweeps // 2
    out_l, out_p = np.empty((n_chains, keep)), np.empty((n_chains, keep))
    out_phi = np.empty((n_chains, keep, E))
    s1, s2 = phi.sum(1), (phi * phi).sum(1)
    acc_n = acc_d = 0
    chains = np.arange(C)
    # whose stale values each chain proposes under: its pilot's, or its own
    source = np.concatenate([chains[n_chains:]] * 2) if pilots else chains
    corrected = chains < n_chains if correct else np.zeros(C, bool)
    for t in range(n_sweeps):
        for _ in range(per_sweep):
            w = int(rng.integers(n_workers))
            idx = batches[w][next_batch[w]]
            next_batch[w] = (next_batch[w] + 1) % len(batches[w])
            k = rng.integers(0, H, C)
            if pilots:  # a chain and its pilot read at the same moment
                k[:n_chains] = k[n_chains:]
            slot = (pos - k) % H
            lam_s, psi2_s = hist_l[source, slot][:, None], hist_p[source, slot][:, None]
            zb, old = z[None, idx], phi[:, idx]
            new = draw_theta(zb, lam_s, psi2_s, rng)
            if correct:
                log_a = correction_log_ratio(new, old, zb, (lam_s, psi2_s),
                                             (lam[:, None], psi2[:, None]))
                ok = (np.log(rng.uniform(size=new.shape)) < np.minimum(log_a, 0.0)) \
                    | ~corrected[:, None]
                new = np.where(ok, new, old)
                if pilots:  # then a random-walk step (``random_walk_step``)
                    walked = random_walk_step(new, zb, (lam[:, None], psi2[:, None]),
                                              rng.standard_normal(new.shape),
                                              np.log(rng.uniform(size=new.shape)))
                    new = np.where(corrected[:, None], walked, new)
                if t >= n_sweeps // 2:
                    acc_n += int(ok[:n_chains].sum())
                    acc_d += ok[:n_chains].size
            phi[:, idx] = new
            s1 += (new - old).sum(1)
            s2 += (new * new - old * old).sum(1)
            lam, psi2 = platform_update(E, s1, s2, lam, rng, prior)
            pos = (pos + 1) % H
            hist_l[:, pos], hist_p[:, pos] = lam, psi2
        # refresh the running sums once per sweep (no floating-point drift)
        s1, s2 = phi.sum(1), (phi * phi).sum(1)
        if (j := t - n_sweeps // 2) >= 0:
            out_l[:, j], out_p[:, j] = lam[:n_chains], psi2[:n_chains]
            out_phi[:, j] = phi[:n_chains]
    return Draws(out_l, out_p, out_phi, acc_n / acc_d if acc_d else 1.0)


# --------------------------------------------------------------------------- summaries

def mcse_mean(x: Array) -> tuple[float, float]:
    """Posterior mean of draws [chains, draws] and its Monte Carlo standard
    error sd/√ESS, ESS from ``kernels.diagnostics.ess_bulk``."""
    ess = float(ess_bulk(x))
    return float(x.mean()), float(x.std() / np.sqrt(max(ess, 1.0)))


def shrinkage_report(draws: Draws, data: Synthetic) -> dict[str, float]:
    """MSE and 95 %-interval coverage of shrunk vs flat effects against the
    true effects, in raw units (θ_e = sd_e φ_e)."""
    theta = draws.phi.reshape(-1, data.sd.size) * data.sd
    shrunk = theta.mean(0)
    lo, hi = np.quantile(theta, [0.025, 0.975], axis=0)
    half = 1.959963984540054 * data.sd
    return {
        "mse_shrunk": float(np.mean((shrunk - data.theta) ** 2)),
        "mse_flat": float(np.mean((data.ybar - data.theta) ** 2)),
        "coverage_shrunk": float(np.mean((lo <= data.theta) & (data.theta <= hi))),
        "coverage_flat": float(np.mean(np.abs(data.ybar - data.theta) <= half)),
        "mean_interval_width_ratio": float(np.mean((hi - lo) / (2 * half))),
    }


def posterior_summary(draws: Draws, sample: Array | None = None) -> dict[str, object]:
    """Means, sds and MCSEs of λ, ψ² and of the φ_e in ``sample``.

    Args: ``draws`` of one sampler run; ``sample``: experiment indices, or None.
    Returns: a JSON-able dict (``lambda``, ``psi2``, φ summaries, ``acceptance``).
    """
    out: dict[str, object] = {}
    for name, x in (("lambda", draws.lam), ("psi2", draws.psi2)):
        m, se = mcse_mean(x)
        out[name] = {"mean": m, "sd": float(x.std()), "mcse": se}
    phi = draws.phi
    out["phi_mean_abs_mean"] = float(np.abs(phi.mean((0, 1))).mean())
    out["phi_mean_sd"] = float(phi.std((0, 1)).mean())
    if sample is not None:
        out["phi_sample"] = {int(e): dict(zip(("mean", "mcse"), mcse_mean(phi[:, :, e]),
                                              strict=True)) for e in sample}
    out["acceptance"] = draws.acceptance
    return out


def exact_hyper_posterior(z: Array, prior: HyperPrior = PRIOR) -> dict[str, dict[str, float]]:
    """Posterior mean and sd of λ and ψ² by quadrature on a 2-d grid, with φ
    integrated out (z_e | λ, ψ² ~ N(λ, 1 + ψ²)): the ground truth that the
    samplers are checked against."""
    se = 1.0 / np.sqrt(z.size)
    lam = np.linspace(z.mean() - 10 * se * z.std(), z.mean() + 10 * se * z.std(), 601)[:, None]
    hi = max(4.0 * z.var(), 1.0)
    psi2 = np.linspace(hi / 4000, hi, 2000)[None, :]
    lp = (-0.5 * (lam - prior.lam_mean) ** 2 / prior.lam_var
          - (prior.a + 1) * np.log(psi2) - prior.b / psi2)
    V = 1.0 + psi2
    ss = (z * z).sum() - 2 * lam * z.sum() + z.size * lam * lam
    lp = lp - 0.5 * z.size * np.log(V) - 0.5 * ss / V
    w = np.exp(lp - lp.max())
    w /= w.sum()
    out = {}
    for name, x in (("lambda", lam), ("psi2", psi2)):
        m = float((w * x).sum())
        out[name] = {"mean": m, "sd": float(np.sqrt((w * x * x).sum() - m * m))}
    return out
