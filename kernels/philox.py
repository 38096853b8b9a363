"""Philox4x32-10, a counter-based RNG, in plain array code (numpy or cupy).

A counter-based generator (Salmon et al. 2011, "Parallel random numbers: as
easy as 1, 2, 3"; the Random123 library) is a keyed bijection of a 128-bit
counter: the random words of an element are a pure function of (key,
counter), with no state to carry and no order to respect. That is what makes
the sampler's draws independent of launch order, of which other problems
share a batch, and of how a batch is split into chunks:

* key (2 × 32 bits): one per *problem*, from the run's seed and the problem's
  identity (``keys_for``), never from its position in the batch;
* counter (4 × 32 bits), per element of a draw::

      c0 = i[-1] | i[-2] << 16      the element's index within its problem,
      c1 = i[-3] | i[-4] << 16      16 bits per axis (chain, variant, stratum…)
      c2 = the sweep's iteration    (state.iteration of that problem)
      c3 = flags << 30 | site << 8 | sub

  where i is the element's multi-index over the non-problem axes (so padding
  a batch to more strata or variants changes no existing element's counter),
  *site* numbers the draw calls within a sweep, and *sub* the blocks one
  element consumes (the rounds of a rejection sampler). Flag bit 30 marks
  draws made outside a sweep (``init``; then c2/site count calls instead),
  bit 31 a shape too big for 16-bit fields (then c0, c1 hold the flat index).

The uint32 arithmetic is done in uint64 arrays: a 32×32-bit product is exact
in 64 bits, its high and low words are a shift and a mask away, so numpy and
cupy give bit-identical words. On cupy the block is one fused elementwise
kernel (native 32-bit ``__umulhi``) checked against the array code.
``philox4x32`` is checked against Random123's known-answer vectors, and
``philox4x64`` (the same construction on 64-bit words, multiplied through
32-bit limbs) against ``numpy.random.Philox``.

On top: 53-bit uniforms (two words, as numpy's ``random()``), normals by
Box–Muller (exact, branch-free; one block per normal), Gamma(a) by
Marsaglia–Tsang (a ≥ 1; a < 1 by the U^(1/a) boost) and Poisson by inversion
(λ < 10) or Hörmann's PTRS (λ ≥ 10, as numpy). The rejection samplers run a
vectorised round over every element, then further rounds over the
not-yet-accepted ones only, each round with its own counters (``sub``), so
they stay exact and per-element deterministic.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from kernels.backend import Array, array_module

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
MASK32 = 0xFFFFFFFF
ROUNDS = 10

# Philox4x64 (numpy's ``Philox``), only to cross-check the construction
M0_64, M1_64 = 0xD2E7470EE14C6C93, 0xCA5A826395121157
W0_64, W1_64 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B

# the same constants as numpy uint64 scalars: array ⊗ constant stays uint64 under
# any promotion rules (numpy 1 or 2, cupy), where a Python int might not
_U = np.uint64
_M0, _M1, _W0, _W1, _MASK = _U(M0), _U(M1), _U(W0), _U(W1), _U(MASK32)
_5, _6, _32 = _U(5), _U(6), _U(32)

TWO_PI = 2.0 * math.pi
INV_2_53 = 1.0 / 9007199254740992.0

FIELD_BITS = 16  # per non-problem axis in c0/c1
SITE_SHIFT, SUB_BITS = 8, 8
SITE_MAX = 1 << (30 - SITE_SHIFT)  # 22 bits of site
FLAG_FREE = 1 << 30  # drawn outside ``begin_sweep`` (init, tests)
FLAG_FLAT = 1 << 31  # element index flat (an axis ≥ 2^16 or > 4 axes)
KEY_DOMAIN = 0x6B657973  # "keys": c3 of the key-derivation blocks
GAMMA_ROUNDS = 127  # 2 attempts per round; sub 0..253, 255 = the a < 1 boost
POISSON_ROUNDS = 254
POISSON_INVERSION_MAX = 10.0


# ------------------------------------------------------------------ the bijection


def _u64(xp, x):
    return xp.asarray(x).astype(xp.uint64)


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """Philox4x32-``rounds`` of counters (c0..c3) under keys (k0, k1).

    Arguments: arrays or ints holding 32-bit values (broadcast together).
    Returns four uint64 arrays, each holding one 32-bit output word.
    On cupy, one fused elementwise kernel (``_fused_philox``) computes the
    same words as the array code (``philox4x32_arrays``), which is ~100
    passes over memory per block; if the kernel cannot be built, the array
    code is used.
    """
    xp = _module(c0, c1, c2, c3, k0, k1)
    if xp is not np and FUSED_ON_CUPY:
        kern = _fused_philox(rounds)
        if kern is not None:
            args = [xp.asarray(c, dtype=xp.uint64) for c in (c0, c1, c2, c3, k0, k1)]
            return kern(*args)
    return philox4x32_arrays(c0, c1, c2, c3, k0, k1, rounds)


FUSED_ON_CUPY = True
_FUSED: dict[int, Any] = {}

_FUSED_BODY = r"""
unsigned int x0 = (unsigned int)c0, x1 = (unsigned int)c1;
unsigned int x2 = (unsigned int)c2, x3 = (unsigned int)c3;
unsigned int ka = (unsigned int)k0, kb = (unsigned int)k1;
#pragma unroll
for (int r = 0; r < ROUNDS; ++r) {
    if (r) { ka += 0x9E3779B9u; kb += 0xBB67AE85u; }
    unsigned int hi0 = __umulhi(0xD2511F53u, x0), lo0 = 0xD2511F53u * x0;
    unsigned int hi1 = __umulhi(0xCD9E8D57u, x2), lo1 = 0xCD9E8D57u * x2;
    unsigned int y0 = hi1 ^ x1 ^ ka, y2 = hi0 ^ x3 ^ kb;
    x0 = y0; x1 = lo1; x2 = y2; x3 = lo0;
}
o0 = x0; o1 = x1; o2 = x2; o3 = x3;
"""


def _fused_philox(rounds: int):
    """The cupy ElementwiseKernel for ``rounds`` rounds (built and checked
    against a known-answer vector on first use), or None if that fails."""
    if rounds in _FUSED:
        return _FUSED[rounds]
    kern = None
    try:
        import cupy

        k = cupy.ElementwiseKernel(
            "uint64 c0, uint64 c1, uint64 c2, uint64 c3, uint64 k0, uint64 k1",
            "uint64 o0, uint64 o1, uint64 o2, uint64 o3",
            _FUSED_BODY.replace("ROUNDS", str(int(rounds))),
            f"liftstream_philox4x32_{int(rounds)}")
        kat = (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
        got = k(*(cupy.asarray([v], dtype=cupy.uint64) for v in kat))
        want = philox4x32_arrays(*kat, rounds=rounds)
        if [int(g.get()[0]) for g in got] != [int(w) for w in want]:
            raise RuntimeError("fused Philox kernel disagrees with the array code")
        kern = k
    except Exception as e:  # noqa: BLE001 - no compiler, no device: use the array code
        import warnings

        warnings.warn(f"fused cupy Philox kernel unavailable ({e}); using array code",
                      RuntimeWarning, stacklevel=3)
    _FUSED[rounds] = kern
    return kern


def philox4x32_arrays(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """``philox4x32`` in plain array operations (numpy or cupy): the same
    arguments, the same four uint64 arrays of 32-bit words."""
    xp = _module(c0, c1, c2, c3, k0, k1)
    x0, x1, x2, x3 = (_u64(xp, c) for c in (c0, c1, c2, c3))
    k0, k1 = _u64(xp, k0), _u64(xp, k1)
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK
            k1 = (k1 + _W1) & _MASK
        p0 = x0 * _M0  # exact: both factors < 2^32
        p1 = x2 * _M1
        x0, x1, x2, x3 = (p1 >> _32) ^ x1 ^ k0, p1 & _MASK, (p0 >> _32) ^ x3 ^ k1, p0 & _MASK
    return x0, x1, x2, x3


def _mulhilo64(xp, a, m: int):
    """(high, low) 64-bit words of a × m (a uint64 array, m a 64-bit constant)."""
    a_lo, a_hi = a & _MASK, a >> _32
    m_lo, m_hi = _U(m & MASK32), _U(m >> 32)
    ll, lh = a_lo * m_lo, a_lo * m_hi
    hl, hh = a_hi * m_lo, a_hi * m_hi
    mid = (ll >> _32) + (lh & _MASK) + (hl & _MASK)  # < 3·2^32: no overflow
    hi = hh + (lh >> _32) + (hl >> _32) + (mid >> _32)
    lo = (mid << _32) | (ll & _MASK)
    return hi, lo


def philox4x64(c0, c1, c2, c3, k0, k1, rounds: int = ROUNDS):
    """Philox4x64-``rounds`` (numpy's ``Philox``); uint64 words in, uint64 out."""
    xp = _module(c0, c1, c2, c3, k0, k1)
    x0, x1, x2, x3 = (xp.asarray(c, dtype=xp.uint64) for c in (c0, c1, c2, c3))
    k0, k1 = xp.asarray(k0, dtype=xp.uint64), xp.asarray(k1, dtype=xp.uint64)
    w0, w1 = xp.uint64(W0_64), xp.uint64(W1_64)
    for r in range(rounds):
        if r:
            with np.errstate(over="ignore"):  # wraps mod 2^64, as it should
                k0, k1 = k0 + w0, k1 + w1
        hi0, lo0 = _mulhilo64(xp, x0, M0_64)
        hi1, lo1 = _mulhilo64(xp, x2, M1_64)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    return x0, x1, x2, x3


def _module(*xs):
    for x in xs:
        if not isinstance(x, int | np.integer) and type(x).__module__.startswith("cupy"):
            return array_module(x)
    return np


# ------------------------------------------------------------------ words → numbers


def to_double(hi, lo, xp=None):
    """53-bit uniform in [0, 1) from two 32-bit words (numpy's ``random()`` recipe)."""
    xp = xp or array_module(hi)
    a = (hi >> _5).astype(xp.float64)
    b = (lo >> _6).astype(xp.float64)
    return (a * 67108864.0 + b) * INV_2_53


def box_muller(w, xp=None):
    """Two independent N(0, 1) from one block: (r cos 2πu₂, r sin 2πu₂),
    r = √(−2 log(1 − u₁)); 1 − u₁ ∈ (0, 1] so the log is finite."""
    xp = xp or array_module(w[0])
    u1 = to_double(w[0], w[1], xp)
    u2 = to_double(w[2], w[3], xp)
    r = xp.sqrt(-2.0 * xp.log1p(-u1))
    t = TWO_PI * u2
    return r * xp.cos(t), r * xp.sin(t)


_LOGGAM_A = (8.333333333333333e-02, -2.777777777777778e-03, 7.936507936507937e-04,
             -5.952380952380952e-04, 8.417508417508418e-04, -1.917526917526918e-03,
             6.410256410256410e-03, -2.955065359477124e-02, 1.796443723688307e-01,
             -1.39243221690590e+00)


def loggam(x: Array) -> Array:
    """log Γ(x) for x > 0 (numpy's ``random_loggam``: Stirling series at x ≥ 7,
    shifted up by the recurrence below 7), branch-free."""
    xp = array_module(x)
    x = xp.asarray(x, dtype=xp.float64)
    n = xp.where(x < 7.0, xp.floor(7.0 - x), 0.0)
    x0 = x + n
    x2 = 1.0 / (x0 * x0)
    gl0 = _LOGGAM_A[9] + 0.0 * x0
    for a in _LOGGAM_A[8::-1]:
        gl0 = gl0 * x2 + a
    gl = gl0 / x0 + 0.5 * math.log(TWO_PI) + (x0 - 0.5) * xp.log(x0) - x0
    for k in range(1, 8):  # subtract log(x0 - k) for k ≤ n
        gl = gl - xp.where(n >= k, xp.log(xp.maximum(x0 - k, 1e-300)), 0.0)
    return xp.where((x == 1.0) | (x == 2.0), 0.0, gl)


# ------------------------------------------------------------------ keys


def seed_key(seed: Any) -> tuple[int, int]:
    """Two 32-bit key words from seed material (int, list of ints or SeedSequence)."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    w = ss.generate_state(2, np.uint32)
    return int(w[0]), int(w[1])


def keys_for(seed: Any, ids) -> np.ndarray:
    """Per-problem keys [P, 2] (uint32 words held in uint64) for problem ids:
    integers (e.g. a problem's index in the whole benchmark) are hashed by
    Philox under the seed's key, strings (``"experiment/metric"``) by BLAKE2b
    with the seed, so a problem's key never depends on the batch it is in."""
    ids = list(ids)
    out = np.empty((len(ids), 2), np.uint64)
    if not ids:
        return out
    if all(isinstance(i, int | np.integer) for i in ids):
        v = np.asarray(ids, dtype=np.uint64)
        k0, k1 = seed_key(seed)
        w = philox4x32(v & _MASK, v >> _32, 0, KEY_DOMAIN, k0, k1)
        out[:, 0], out[:, 1] = w[0], w[1]
        return out
    base = repr(seed_key(seed)).encode()
    for j, name in enumerate(ids):
        h = hashlib.blake2b(base + b"\0" + str(name).encode(), digest_size=8).digest()
        out[j, 0] = int.from_bytes(h[:4], "little")
        out[j, 1] = int.from_bytes(h[4:], "little")
    return out


# ------------------------------------------------------------------ the stream


class PhiloxStream:
    """The per-problem draws of a batch: ``keys`` [P, 2], and per sweep the
    problems' iterations (``begin_sweep``) and a site counter.

    The problem axis of a draw's shape is axis 0 when its length is P, else
    the first axis of length P: call sites should put problems first (a shape
    like (2, P, …) is ambiguous when P = 2, and batch invariance then fails)."""

    def __init__(self, seed: Any, xp=np, keys=None):
        self.xp = xp
        self._seed = seed
        self._keys_host = None if keys is None else np.asarray(keys, dtype=np.uint64)
        self._k = None  # (k0, k1) on the device, [P]
        self.P: int | None = None if keys is None else len(self._keys_host)
        self._positional = keys is None  # keys_for(seed, range(P)), P from the draws
        self._iter = None  # [P] uint64 on the device, inside a sweep
        self._site = 0  # draw calls since begin_sweep
        self._free = 0  # draw calls outside any sweep, since creation
        if self._keys_host is not None:
            self._upload_keys()

    # -- set-up

    def _upload_keys(self) -> None:
        k = self.xp.asarray(self._keys_host)
        self._k = (k[:, 0], k[:, 1])

    def _ensure_keys(self, P: int, shape: tuple[int, ...] | None = None) -> None:
        """Positional keys for P problems, derived on first use, and again if
        draws for a batch of another size come (no axis of the old P)."""
        new_P = self.P is None or (self._positional and shape is not None
                                   and self.P not in shape)
        if new_P:
            self.P = P
            self._keys_host = keys_for(self._seed, range(P))
            self._upload_keys()

    def begin_sweep(self, iteration) -> None:
        """Counters of the next draws: sweep ``iteration`` [P] of each problem."""
        it = self.xp.asarray(iteration).astype(self.xp.uint64).reshape(-1)
        self._ensure_keys(int(it.shape[0]))
        if int(it.shape[0]) != self.P:
            raise ValueError(f"begin_sweep: {it.shape[0]} iterations for {self.P} problems")
        self._iter = it & _MASK
        self._site = 0

    def end_sweep(self) -> None:
        """Draws after this are outside a sweep again (counted per call)."""
        self._iter = None

    # -- counters

    def _problem_axis(self, shape: tuple[int, ...]) -> int:
        if not shape:
            raise ValueError("Philox draws need a problem axis")
        self._ensure_keys(int(shape[0]), shape)
        if shape[0] == self.P:
            return 0
        for ax, n in enumerate(shape):
            if n == self.P:
                return ax
        raise ValueError(f"shape {shape} has no axis of length P = {self.P}")

    def counters(self, shape) -> tuple:
        """(c0, c1, c2, c3, k0, k1) broadcastable to ``shape`` for the next call
        site; c3 has ``sub`` = 0 (add the block number within the element)."""
        xp = self.xp
        shape = tuple(int(n) for n in shape)
        ax = self._problem_axis(shape)
        if self._iter is not None:
            site = self._site
            self._site += 1
        else:
            site = self._free
            self._free += 1
        others = [i for i in range(len(shape)) if i != ax]

        def along(i: int, v):
            s = [1] * len(shape)
            s[i] = shape[i]
            return v.reshape(s)

        flags = 0
        c0 = c1 = xp.zeros((), xp.uint64)
        if len(others) <= 4 and all(shape[i] <= 1 << FIELD_BITS for i in others):
            for j, i in enumerate(reversed(others)):
                term = along(i, xp.arange(shape[i], dtype=xp.uint64) << _U(FIELD_BITS * (j % 2)))
                if j < 2:
                    c0 = c0 | term
                else:
                    c1 = c1 | term
        else:  # flat index over the non-problem axes (64 bits)
            flags |= FLAG_FLAT
            sub_shape = [shape[i] for i in others]
            n = int(np.prod(sub_shape)) if sub_shape else 1
            flat = xp.arange(n, dtype=xp.uint64).reshape(sub_shape)
            flat = xp.expand_dims(flat, ax)
            c0, c1 = flat & _MASK, flat >> _32
        k0, k1 = along(ax, self._k[0]), along(ax, self._k[1])
        if self._iter is not None:
            c2 = along(ax, self._iter)
            if site >= SITE_MAX:
                raise RuntimeError("more than 2^22 draw calls in one sweep")
        else:  # outside a sweep: the call number itself, spread over c2 and the site
            flags |= FLAG_FREE
            c2 = xp.asarray(site // SITE_MAX, dtype=xp.uint64)
            site = site % SITE_MAX
        c3 = xp.asarray(flags | (site << SITE_SHIFT), dtype=xp.uint64)
        return c0, c1, c2, c3, k0, k1

    def block(self, shape):
        """One Philox block (four uint64-held words, each of ``shape``) per element."""
        c0, c1, c2, c3, k0, k1 = self.counters(shape)
        return tuple(self.xp.broadcast_to(w, tuple(shape))
                     for w in philox4x32(c0, c1, c2, c3, k0, k1))

    # -- distributions

    def uniform(self, shape) -> Array:
        """Uniforms in [0, 1) of ``shape`` (leading axis: problems), 53 bits each."""
        w = self.block(shape)
        return to_double(w[0], w[1], self.xp)

    def normal(self, shape) -> Array:
        """Standard normals of ``shape`` (leading axis: problems), by Box–Muller."""
        return box_muller(self.block(shape), self.xp)[0]

    def gamma(self, a: Array) -> Array:
        """Gamma(a, 1) elementwise; 0 where a = 0, NaN where a < 0."""
        xp = self.xp
        a = xp.asarray(a, dtype=xp.float64)
        shape = a.shape
        ctr = [xp.broadcast_to(c, shape).ravel() for c in self.counters(shape)]
        af = a.ravel()
        ok = af > 0
        boost = ok & (af < 1.0)
        aa = xp.where(ok, xp.where(boost, af + 1.0, af), 1.0)
        d = aa - 1.0 / 3.0
        c = 1.0 / xp.sqrt(9.0 * d)
        out = xp.zeros(af.shape, xp.float64)
        idx = None  # None: every element
        for r in range(GAMMA_ROUNDS):
            sel = ctr if idx is None else [v[idx] for v in ctr]
            dd, cc = (d, c) if idx is None else (d[idx], c[idx])
            c0, c1, c2, c3, k0, k1 = sel
            z1, z2 = box_muller(philox4x32(c0, c1, c2, c3 + _U(2 * r), k0, k1), xp)
            wu = philox4x32(c0, c1, c2, c3 + _U(2 * r + 1), k0, k1)
            x1, acc1 = _mt_attempt(xp, z1, to_double(wu[0], wu[1], xp), dd, cc)
            x2, acc2 = _mt_attempt(xp, z2, to_double(wu[2], wu[3], xp), dd, cc)
            acc = acc1 | acc2
            val = xp.where(acc1, x1, x2)
            if idx is None:
                out = xp.where(acc, val, out)
                idx = xp.nonzero(~acc)[0]
            else:
                out[idx[acc]] = val[acc]
                idx = idx[~acc]
            if int(idx.size) == 0:
                break
        else:
            raise RuntimeError("gamma: Marsaglia–Tsang did not accept in 254 attempts")
        if bool(boost.any()):
            wb = philox4x32(*ctr[:3], ctr[3] + _U((1 << SUB_BITS) - 1), *ctr[4:])
            u = to_double(wb[0], wb[1], xp)
            out = xp.where(boost, out * xp.exp(xp.log1p(-u) / xp.where(boost, af, 1.0)), out)
        out = xp.where(ok, out, xp.where(af == 0, 0.0, xp.nan))
        return out.reshape(shape)

    def poisson(self, lam: Array) -> Array:
        """Poisson(λ) elementwise (int64): inversion below λ = 10, PTRS above."""
        xp = self.xp
        lam = xp.asarray(lam, dtype=xp.float64)
        shape = lam.shape
        ctr = [xp.broadcast_to(c, shape).ravel() for c in self.counters(shape)]
        lf = lam.ravel()
        out = xp.zeros(lf.shape, xp.int64)
        small = xp.nonzero((lf > 0) & (lf < POISSON_INVERSION_MAX))[0]
        large = xp.nonzero(lf >= POISSON_INVERSION_MAX)[0]
        if int(small.size):
            out[small] = _poisson_inversion(xp, lf[small], [v[small] for v in ctr])
        if int(large.size):
            out[large] = _poisson_ptrs(xp, lf[large], [v[large] for v in ctr])
        return out.reshape(shape)


def _log0(xp, u):
    """log u with log 0 = -inf, without a warning."""
    return xp.where(u > 0, xp.log(xp.where(u > 0, u, 1.0)), -xp.inf)


def _mt_attempt(xp, z, u, d, c):
    """One Marsaglia–Tsang attempt: (value d·v, accepted)."""
    t = 1.0 + c * z
    v = t * t * t
    pos = v > 0
    lv = xp.log(xp.where(pos, v, 1.0))
    acc = pos & (_log0(xp, u) < 0.5 * z * z + d - d * v + d * lv)
    return d * v, acc


def _poisson_inversion(xp, lam, ctr):
    """Sequential-search inversion of one uniform (λ < 10): P(K > 120) < 1e-80."""
    c0, c1, c2, c3, k0, k1 = ctr
    w = philox4x32(c0, c1, c2, c3, k0, k1)
    u = to_double(w[0], w[1], xp)
    k = xp.zeros(lam.shape, xp.float64)
    p = xp.exp(-lam)
    s = p.copy()
    for step in range(1, 121):
        more = u > s
        if step % 8 == 0 and not bool(more.any()):
            break
        p = p * lam / step
        s = s + xp.where(more, p, 0.0)
        k = k + more
    return k.astype(xp.int64)


def _poisson_ptrs(xp, lam, ctr):
    """Hörmann (1993) transformed rejection with squeeze, λ ≥ 10 (numpy's
    ``random_poisson_ptrs``), one block (U, V) per attempt, rounds over the
    rejected elements only."""
    slam = xp.sqrt(lam)
    loglam = xp.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2.0)
    out = xp.zeros(lam.shape, xp.float64)
    idx = None
    for r in range(POISSON_ROUNDS):
        sel = ctr if idx is None else [v[idx] for v in ctr]
        c0, c1, c2, c3, k0, k1 = sel
        la, sl, ll, bb, aa, ia, vv = ((lam, slam, loglam, b, a, invalpha, vr) if idx is None else
                                      (lam[idx], slam[idx], loglam[idx], b[idx], a[idx],
                                       invalpha[idx], vr[idx]))
        w = philox4x32(c0, c1, c2, c3 + _U(r), k0, k1)
        U = to_double(w[0], w[1], xp) - 0.5
        V = to_double(w[2], w[3], xp)
        us = 0.5 - xp.abs(U)
        uss = xp.where(us > 0, us, 1.0)
        k = xp.floor((2.0 * aa / uss + bb) * U + la + 0.43)
        quick = (us >= 0.07) & (V <= vv)
        bad = (k < 0) | ((us < 0.013) & (V > us)) | (us <= 0)
        kk = xp.maximum(k, 0.0)
        lhs = _log0(xp, V) + xp.log(ia) - xp.log(aa / (uss * uss) + bb)
        rhs = -la + kk * ll - loggam(kk + 1.0)
        acc = quick | (~bad & (lhs <= rhs))
        if idx is None:
            out = xp.where(acc, k, out)
            idx = xp.nonzero(~acc)[0]
        else:
            out[idx[acc]] = k[acc]
            idx = idx[~acc]
        if int(idx.size) == 0:
            break
    else:
        raise RuntimeError("poisson: PTRS did not accept in 254 attempts")
    return out.astype(xp.int64)
