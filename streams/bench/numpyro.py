"""NumPyro NUTS baseline for ``liftstream bench sampler`` (docs/architecture.md#the-model).

Why a baseline: the batched partially collapsed Gibbs sweep of ``kernels.gibbs``
is hand-written; the obvious alternative is a general-purpose gradient sampler
on the same model. This module states that model in NumPyro and samples it
with NUTS, so the benchmark compares sampling *efficiency* (ESS per second of
the estimand people read) and checks that both samplers target the same
posterior (per-problem posterior means agree within Monte Carlo error).

The model is the one in ``kernels/gibbs.py``'s docstring, with the same
data-scaled priors read from ``kernels.data.Hyper`` (per problem, m and s the
pooled outcome mean and sd):

    μ_0s ~ N(m, (2s)²)             σ²_ks ~ InvGamma(1, s²)
    θ_k, β_k ~ N(0, s²)             ω_k ~ half-t_3(0, s/2)  (a folded Student t)
    τ_ks = θ_k + β_k z_s + ω_k η_ks,  η_ks ~ N(0, 1)   (non-centred)
    Y | k, s ~ N(μ_0s + τ_ks, σ²_ks)  from the cells' (n, Σy, Σy²) via a factor
    logit p_s: ``kernels.arrival.log_density`` (N_s integrated out) via a factor

The non-centred τ is used because it is the faster of the two here: ω is often
small relative to the strata's standard errors, and the centred form then has
the ω–τ funnel (more divergences, deeper trees). ``parametrisation="centred"``
is kept for comparison. After sampling, N_s is drawn from its negative
binomial given each draw of p_s and the adjusted effect Σ π_s τ_ks is computed
by ``kernels.estimands`` in NumPy, exactly as for the Gibbs chains.

All P problems form one model (a plate over problems): one NUTS run, one step
size and one diagonal mass matrix for all of them, chains vectorised
(``chain_method="vectorized"``), float64, JAX on CPU. That is the natural way
to batch problems in NumPyro; its cost is that every iteration's tree depth is
set by the hardest problem.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels import arrival
from kernels.backend import to_numpy
from kernels.data import ModelData
from kernels.estimands import estimands
from kernels.gibbs import State
from kernels.rng import Rng

TARGET_ACCEPT = 0.8  # NumPyro's default; no divergences with the non-centred τ
MAX_TREE_DEPTH = 10  # NumPyro's default


def import_error() -> str | None:
    """None when numpyro and jax import, else why not (for ``--numpyro auto``)."""
    try:
        import jax  # noqa: F401
        import numpyro  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(e).__name__}: {e}"
    return None


def _jax():
    """jax configured as the baseline needs it: float64, CPU (set before any array)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platforms", "cpu")
    return jax


def arrival_log_density(x, n, T, D, m, sd):
    """``kernels.arrival.log_density`` in jax.numpy (the same arithmetic, term by term)."""
    import jax.numpy as jnp

    sp = jnp.logaddexp(0.0, x)  # -log(1-p)
    log_p = x - sp
    Dsafe = jnp.maximum(D, 1.0)
    log_q = jnp.log(-jnp.expm1(-Dsafe * sp))
    lik = n * (log_p - log_q) - T * sp
    lik = jnp.where(D >= 1, lik, 0.0)
    return -0.5 * ((x - m) / sd) ** 2 + lik


def model_inputs(data: ModelData) -> dict[str, np.ndarray]:
    """Host float64 arrays the NumPyro model needs (sufficient stats, priors, arrival)."""
    h = data.hyper
    n = to_numpy(data.n)
    sy = to_numpy(data.sy)
    syy = to_numpy(data.syy)
    nn = np.maximum(n, 1.0)
    P = n.shape[0]
    S = n.shape[2]

    def per_problem(v) -> np.ndarray:
        return np.broadcast_to(np.asarray(to_numpy(v), float), (P,)).copy()

    return {
        "n": n,
        "ybar": np.where(n > 0, sy / nn, 0.0),
        "ssw": np.where(n > 0, np.maximum(syy - sy * sy / nn, 0.0), 0.0),
        "z": to_numpy(data.z),
        "arrived": to_numpy(data.arrived),
        "dsum": to_numpy(data.dsum),
        "D": np.broadcast_to(to_numpy(data.D)[:, None], (P, S)).copy(),
        "p_m": to_numpy(data.logit_p0),
        "p_sd": np.broadcast_to(to_numpy(data.p_sd)[:, None], (P, S)).copy(),
        "m": per_problem(h.m),
        "mu0_sd": per_problem(h.mu0_sd),
        "sig_a": per_problem(h.sig_a),
        "sig_b": per_problem(h.sig_b),
        "theta_sd": per_problem(h.theta_sd),
        "beta_sd": per_problem(h.beta_sd),
        "omega_nu": np.asarray(float(h.omega_nu)),
        "omega_scale": per_problem(h.omega_scale),
    }


def make_model(parametrisation: str = "noncentred") -> Callable[[dict[str, Any]], None]:
    """The model as a NumPyro function of ``model_inputs`` (as jax arrays)."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    if parametrisation not in ("noncentred", "centred"):
        raise ValueError(f"parametrisation {parametrisation!r} (noncentred|centred)")

    def model(d: dict[str, Any]) -> None:
        P, K1, S = d["n"].shape
        K = K1 - 1
        with numpyro.plate("problems", P, dim=-1):
            mu0 = numpyro.sample("mu0", dist.Normal(d["m"][:, None], d["mu0_sd"][:, None])
                                 .expand([P, S]).to_event(1))
            sigma2 = numpyro.sample(
                "sigma2", dist.InverseGamma(d["sig_a"][:, None, None], d["sig_b"][:, None, None])
                .expand([P, K1, S]).to_event(2))
            theta = numpyro.sample(
                "theta", dist.Normal(0.0, d["theta_sd"][:, None]).expand([P, K]).to_event(1))
            beta = numpyro.sample(
                "beta", dist.Normal(0.0, d["beta_sd"][:, None]).expand([P, K]).to_event(1))
            # half-t_ν(0, A): |t| of a Student t folded at 0 (NumPyro has no HalfStudentT)
            omega = numpyro.sample(
                "omega", dist.FoldedDistribution(
                    dist.StudentT(d["omega_nu"], 0.0, d["omega_scale"][:, None]).expand([P, K]))
                .to_event(1))
            g = theta[..., None] + beta[..., None] * d["z"][:, None, :]  # [P,K,S]
            if parametrisation == "noncentred":
                eta = numpyro.sample("eta", dist.Normal(0.0, 1.0).expand([P, K, S]).to_event(2))
                tau = g + omega[..., None] * eta
            else:
                tau = numpyro.sample(
                    "tau", dist.Normal(g, omega[..., None]).to_event(2))
            # cells from sufficient statistics: Σ_i log N(y_i | μ, σ²)
            #   = -n/2 log(2π σ²) - (SS_within + n (ȳ - μ)²) / (2σ²); zero for n = 0
            mu = jnp.concatenate([mu0[:, None, :], mu0[:, None, :] + tau], axis=1)
            n = d["n"]
            ll = -0.5 * n * jnp.log(2.0 * math.pi * sigma2) - (
                d["ssw"] + n * (d["ybar"] - mu) ** 2) / (2.0 * sigma2)
            numpyro.factor("cells", ll.sum(axis=(-2, -1)))
            # arrival block, N_s integrated out: the same density the Gibbs grid samples
            x = numpyro.sample(
                "logit_p", dist.ImproperUniform(constraints.real, (P,), (S,)))
            numpyro.factor("arrival", arrival_log_density(
                x, d["arrived"], d["dsum"], d["D"], d["p_m"], d["p_sd"]).sum(-1))

    return model


@dataclass
class NutsResult:
    """Timings, NUTS diagnostics and the adjusted-effect trace [P, C, T, K] (host)."""

    stats: dict[str, Any]
    adj_effect: np.ndarray


def run_nuts(data: ModelData, chains: int, warmup: int, samples: int, seed: int = 0,
             parametrisation: str = "noncentred", target_accept: float = TARGET_ACCEPT,
             log: Callable[[str], None] | None = None) -> NutsResult:
    """Warm up, then sample; compilation, warm-up and sampling timed apart.

    Uses NumPyro's NUTS kernel directly (``init`` vectorised over chains, then
    ``sample`` in a loop) rather than ``MCMC.run``: ``MCMC`` re-traces and
    re-compiles its loop inside every call, and at small P compilation is most
    of the wall time. Here one loop, ``n`` iterations with ``n`` a runtime
    argument, is compiled ahead of time (``jit(...).lower().compile()``) and
    serves both phases, so ESS/s measures sampling alone and XLA compiles once
    (on 2 CPU cores that is 10-20 s). It is the computation
    ``MCMC(..., chain_method="vectorized")`` performs: ``NUTS.init`` with a
    batch of keys vmaps the initialisation and the kernel, and the kernel
    adapts step size and mass matrix while its iteration count is below
    ``warmup``.
    """
    if data.cov is not None:
        raise ValueError("the NumPyro baseline has no covariate block: it would sample "
                         "another posterior than the Gibbs sweep (build the data without cov)")
    jax = _jax()
    import jax.numpy as jnp
    import numpyro
    from numpyro.infer import NUTS

    d = {k: jnp.asarray(v) for k, v in model_inputs(data).items()}
    kernel = NUTS(make_model(parametrisation), target_accept_prob=target_accept,
                  max_tree_depth=MAX_TREE_DEPTH)
    keys = jax.random.split(jax.random.PRNGKey(seed), chains)

    def iterate(state, n):
        """n NUTS iterations; iteration i < ``samples`` is recorded in slot i."""
        def record(s):
            return (s.z, s.num_steps, s.diverging, s.accept_prob)

        buf = jax.tree.map(lambda x: jnp.zeros((samples,) + x.shape, x.dtype), record(state))

        def body(i, carry):
            s, b = carry
            s = kernel.sample(s, (d,), {})
            b = jax.tree.map(lambda a, v: a.at[i].set(v, mode="drop"), b, record(s))
            return s, b

        return jax.lax.fori_loop(0, n, body, (state, buf))

    if log:
        log(f"numpyro: init and compile ({chains} vectorised chains)")
    t0 = time.perf_counter()
    state = kernel.init(keys, warmup, None, (d,), {})  # vmapped over the key batch
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    n_arg = jnp.asarray(samples, dtype=jnp.int64)
    t0 = time.perf_counter()
    loop = jax.jit(iterate).lower(state, n_arg).compile()
    compile_s = time.perf_counter() - t0

    if log:
        log(f"numpyro: {warmup} warm-up iterations")
    t0 = time.perf_counter()
    state, _ = loop(state, jnp.asarray(warmup, dtype=jnp.int64))
    jax.block_until_ready(state)
    warm_s = time.perf_counter() - t0
    step_size = np.atleast_1d(np.asarray(state.adapt_state.step_size))

    if log:
        log(f"numpyro: {samples} sampling iterations")
    t0 = time.perf_counter()
    state, (z, steps, div, acc) = loop(state, n_arg)
    jax.block_until_ready(z)
    sample_s = time.perf_counter() - t0

    constrain = kernel.postprocess_fn((d,), {})
    smp = jax.vmap(jax.vmap(constrain))(z)  # [T, C, P, …] constrained
    smp = {k: np.swapaxes(np.asarray(v), 0, 1) for k, v in smp.items()}  # [C, T, P, …]
    adj = adjusted_effect(smp, data, chains, samples, seed, parametrisation)
    steps = np.asarray(steps, float)
    stats = {
        "parametrisation": parametrisation,
        "target_accept": target_accept,
        "max_tree_depth": MAX_TREE_DEPTH,
        "mass_matrix": "diagonal",
        "chain_method": "vectorized",
        "dtype": "float64",
        "jax_backend": jax.default_backend(),
        "numpyro_version": numpyro.__version__,
        "jax_version": jax.__version__,
        "warmup_iterations": warmup,
        "samples": samples,
        "init_s": init_s,
        "compile_s": compile_s,
        "warmup_s": warm_s,
        "sample_s": sample_s,
        "iterations_per_s": samples / sample_s,
        "mean_leapfrog_steps": float(steps.mean()),
        "max_leapfrog_steps": int(steps.max()),
        "divergences": int(np.asarray(div).sum()),
        "mean_accept_prob": float(np.asarray(acc).mean()),
        "step_size": [float(v) for v in step_size],
    }
    return NutsResult(stats, adj)


def adjusted_effect(smp: dict[str, Any], data: ModelData, chains: int, samples: int,
                    seed: int, parametrisation: str) -> np.ndarray:
    """[P, C, T, K] adjusted effect from NUTS draws, N_s drawn per draw
    (docs/architecture.md#the-model).

    The draws (NumPyro's [C, T, P, …]) become [P, C·T, …] "chains" so that
    ``kernels.arrival.draw_population`` and ``kernels.estimands.estimands``, the
    very functions the Gibbs sampler uses, compute N and the estimand.
    """
    def flat(v) -> np.ndarray:
        a = np.asarray(v, float)  # [C, T, P, ...]
        a = np.moveaxis(a, 2, 0)  # [P, C, T, ...]
        return a.reshape((a.shape[0], chains * samples) + a.shape[3:])

    mu0 = flat(smp["mu0"])  # [P, CT, S]
    if parametrisation == "noncentred":
        z = to_numpy(data.z)[:, None, None, :]
        tau = (flat(smp["theta"])[..., None] + flat(smp["beta"])[..., None] * z
               + flat(smp["omega"])[..., None] * flat(smp["eta"]))
    else:
        tau = flat(smp["tau"])
    logit_p = flat(smp["logit_p"])
    host = _host_data(data)
    pop = arrival.draw_population(logit_p, host.arrived, host.D, Rng([seed, 7]))
    # a whole ``State`` (not a namespace of the fields used today), so a field
    # ``estimands`` starts reading fails here at construction, loudly; the
    # baseline has no covariate block, so its slopes γ are 0 (as ``gibbs.init``
    # leaves them without a covariate) and so is the reported slope
    state = State(mu0=mu0, tau=tau, sigma2=flat(smp["sigma2"]), theta=flat(smp["theta"]),
                  beta=flat(smp["beta"]), omega2=flat(smp["omega"]) ** 2, logit_p=logit_p,
                  pop=pop, iteration=np.full(mu0.shape[0], samples, np.int64),
                  gamma=np.zeros(mu0.shape + (2,)))
    adj = estimands(state, host).adj_effect  # [P, CT, K]
    return adj.reshape(adj.shape[0], chains, samples, adj.shape[-1])


def _host_data(data: ModelData) -> ModelData:
    """``data`` with its arrays on the host (the Gibbs side may be on a GPU)."""
    if data.xp is np:
        return data
    import copy

    host = copy.copy(data)
    for k in ("n", "sy", "syy", "arrived", "dsum", "D", "logit_p0", "p_sd", "z", "smask",
              "kmask", "target"):
        setattr(host, k, to_numpy(getattr(data, k)))
    return host
