"""Edge-triggered alerts from estimate records (docs/architecture.md#data-flow; issue 4 "Alerts").

Pure functions, no I/O. After each sampler tick the caller passes one
experiment's new estimate records together with the alert state it stored
(in Redis) after the previous call, and gets back the alert records to publish
on ``liftstream.alerts`` (key = ``alert_id``) and the new state to store::

    alerts, state = evaluate(config, records, state, now_ms)

Why edge-triggered: a condition that holds for days would otherwise produce a
record every tick and bury the ones that matter. A record is emitted when a
condition starts (``state: "firing"``) and when it stops (``"resolved"``),
never while it stays; both share the stable ``alert_id`` =
``<experiment>|<kind>|<metric>|<variant>`` (metric/variant empty for
experiment-level alerts; names cannot contain ``|``, so the id is unambiguous).
Consumers can therefore deduplicate on ``(alert_id, state, created_at)`` and a
replayed tick that re-sends the same state emits nothing new.

Why hysteresis: posteriors move a little every tick. A condition compared with
one level flaps on and off when its statistic hovers at that level. Each kind
fires at its ``*`` level and, once firing, resolves only at the looser
``*_resolve_*`` level (table below), so a statistic must move materially back
before the alert clears.

Thresholds (``ExperimentConfig.alert_thresholds`` overrides any of them; a
``*_resolve_*`` key that is not given is derived from its (possibly overridden)
firing key by the rule shown, and an explicit one is clamped to the non-firing
side of its firing level so that the pair can never flap; values outside their
domain fall back to the default, because a bad number in a config must not stop
the sampler; unknown keys are ignored, see ``unknown_threshold_keys``):

============================  =======  =======================================
key                           default  meaning
============================  =======  =======================================
guardrail_prob                0.95     fire when P(breach) > this
guardrail_resolve_prob        0.90     (= fire - 0.05) resolve when P(breach) < this
decision_prob                 0.95     fire when P(effect>0) > this or < 1 - this
decision_resolve_prob         0.90     (= fire - 0.05) resolve when inside [1-this, this]
decision_rhat                 1.01     ... and R-hat < this
decision_resolve_rhat         1.05     (= fire + 0.04) resolve when R-hat >= this
decision_ess                  400      ... and bulk ESS >= this
decision_resolve_ess          200      (= 0.5 fire) resolve when bulk ESS < this
srm_alpha                     0.001    anytime-valid level: e-value >= 1/alpha
srm_floor                     0.01     ... and max_i |share_i/alloc_i - 1| > this
srm_resolve_floor             0.008    (= 0.8 fire) resolve when deviation <= this
srm_concentration             1000     Dirichlet prior size a (kernels.srm)
not_converged_rhat            1.05     fire when R-hat > this ...
not_converged_min_iteration   2000     ... once the chains ran this many sweeps
not_converged_resolve_rhat    1.03     (= 1 + 0.6 (fire - 1)) resolve when R-hat <= this
bias_prob                     0.05     fire when adjusted P(naive's side of 0) < this
bias_resolve_prob             0.10     (= 2 fire) ... resolves when >= this
bias_interval                 1.0      or when |naive - adj mean| > this x the 95% half-width
bias_resolve_interval         0.9      (= 0.9 fire) ... resolves when <= this
data_loss_share               0.005    fire when the window's dropped share > this
data_loss_resolve_share       0.0025   (= 0.5 fire) resolve when it is <= this
data_loss_min_events          1000     events a window needs before it is judged
novelty_prob                  0.99     fire when novelty P(>0) > this or < 1 - this
novelty_resolve_prob          0.95     (= fire - 0.04) resolve when inside [1-this, this]
novelty_margin                0.02     ... and |novelty contrast| (lift) > this
novelty_resolve_margin        0.016    (= 0.8 fire) resolve when |contrast| <= this
============================  =======  =======================================

The conditions, per metric and treatment variant unless said otherwise:

- ``guardrail_breach`` (metrics with a ``guardrail_threshold`` g): P(adjusted
  effect beyond |g| in the metric's bad direction), i.e. P(effect < -|g|) for
  ``direction = increase`` and P(effect > |g|) for ``decrease``. g is in metric
  units (effect, not lift) and is read as a magnitude, so ``-0.5`` and ``0.5``
  mean the same tolerated harm. The records carry the posterior's mean/sd/
  interval, not its draws, so the probability uses the normal approximation
  N(mean, sd). It is not gated on convergence: a possible breach is worth a
  look even from an unconverged chain (R-hat is in the evidence). Suggested
  contract addition: a ``p_beyond_guardrail`` field in the estimate record,
  computed from the draws by the summary kernel, would make this exact.
  Every metric kind (issue 26) has a guardrail, on its published adjusted
  effect and so in that effect's units: a ``sum``'s in metric units (the
  capped effect when the metric has a ``cap``), a ``conversion``'s in
  probability points (0.01 = one percentage point of conversion rate; the
  message says "pp"), a ``ratio``'s in ratio units (R_treatment - R_control,
  e.g. revenue per session). The message names the kind's units.
- ``decision_ready``: the record's always-valid ``decision.ready`` (issue 27,
  docs/method.md §8: a confidence sequence on the adjusted effect, one look
  per ``look_seconds`` of data time, e-BH over the secondary metrics). Its
  level is the config's ``decision_alpha``; the message states the rule, α
  and the sequence. The ``decision_*`` thresholds below belonged to the
  per-look rule it replaced (P(>0) beyond 0.95 at any tick, which declared
  a winner in about half of all A/A experiments over 14 days of hourly looks)
  and are ignored.
- ``sample_ratio_mismatch`` (experiment-level): exposures per variant
  (``units.exposed``) against ``config.allocation`` (equal if None) with the
  anytime-valid test of ``kernels.srm``; its running max of log BF is kept in
  the state (``state["srm"]``) and reset when the variants or the allocation
  change. Once the e-value has crossed 1/alpha it stays crossed (that is what
  anytime-valid means), so the alert resolves only through the practical floor,
  e.g. after a fixed assignment bug has let the cumulative shares recover.
- ``not_converged``: R-hat > ``not_converged_rhat`` once the chains ran
  ``not_converged_min_iteration`` sweeps (earlier, a high R-hat is warm-up).
  An undefined (null) R-hat changes nothing.
- ``early_adopter_bias`` (stratified estimates only; with ``adjustment:
  unavailable`` adjusted equals naive): the naive mean lies outside the
  adjusted 95% interval (``bias_interval`` half-widths, on the side it lies),
  or the adjusted posterior puts less than ``bias_prob`` on the naive mean's
  side of zero (``p_positive`` or ``1 - p_positive``, from draws, rather than a
  normal approximation).
- ``data_loss`` (experiment-level): events lost to the estimate (``late``,
  ``expired``, ``too_old``, dead letters: the record's ``data_quality.dropped``)
  as a share of the events that arrived *recently*. The record's totals are
  cumulative, and a cumulative share never comes back down once drops stop, so
  the state keeps *marks*: the (events, dropped) totals at earlier evaluations
  (``state["data_loss"]``), starting from an implicit (0, 0). The window runs
  from the newest mark at least ``data_loss_min_events`` events behind the
  current totals up to them; its share = new dropped / new events. With fewer
  new events than that there is no window and nothing changes, so an idle
  experiment neither fires nor resolves, and a handful of events cannot flap
  it. A mark is added when the events grew by a quarter of
  ``data_loss_min_events`` since the last one, and marks older than the window's
  start are pruned, so the state holds a few marks. Totals that went down
  (the experiment's state was rebuilt) restart the marks at (0, 0). The first
  evaluation judges everything counted so far. Held metrics that expire on an
  experiment receiving no events raise ``dropped`` but not ``events``: they
  count in the next window that has enough events.
- ``novelty_effect`` (records with ``novelty``, issue 19): the treatment's
  lift on a unit's first days since exposure differs from its lift later,
  within fine activity strata: ``novelty.p_positive`` (of the
  precision-weighted ``contrast``) above ``novelty_prob`` (novelty: the
  first days look better) or below its complement (primacy), and the
  contrast's |mean| above the practical ``novelty_margin`` (in lift). It is
  evaluated per tick like the others, so a stream of looks raises its false
  alarms above the per-look rate (docs/method.md has both).

An alert whose metric, variant or guardrail has been removed from the
configuration resolves with a message saying so. A (metric, variant) missing
from one call's records keeps its alerts as they are: no news is not a change.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from kernels.srm import log_bayes_factor
from schemas.records import ExperimentConfig, MetricSpec

__all__ = [
    "ALERT_KINDS",
    "DEFAULT_THRESHOLDS",
    "STATE_VERSION",
    "alert_id",
    "evaluate",
    "initial_state",
    "thresholds",
    "unknown_threshold_keys",
]

SCHEMA_VERSION = 1
STATE_VERSION = 1

ALERT_KINDS: tuple[str, ...] = (
    "guardrail_breach",
    "decision_ready",
    "sample_ratio_mismatch",
    "not_converged",
    "early_adopter_bias",
    "data_loss",
    "novelty_effect",
)

DEFAULT_THRESHOLDS: dict[str, float] = {
    "guardrail_prob": 0.95,
    "guardrail_resolve_prob": 0.90,
    "decision_prob": 0.95,
    "decision_resolve_prob": 0.90,
    "decision_rhat": 1.01,
    "decision_resolve_rhat": 1.05,
    "decision_ess": 400.0,
    "decision_resolve_ess": 200.0,
    "srm_alpha": 0.001,
    "srm_floor": 0.01,
    "srm_resolve_floor": 0.008,
    "srm_concentration": 1000.0,
    "not_converged_rhat": 1.05,
    "not_converged_min_iteration": 2000.0,
    "not_converged_resolve_rhat": 1.03,
    "bias_prob": 0.05,
    "bias_resolve_prob": 0.10,
    "bias_interval": 1.0,
    "bias_resolve_interval": 0.9,
    "data_loss_share": 0.005,
    "data_loss_resolve_share": 0.0025,
    "data_loss_min_events": 1000.0,
    "novelty_prob": 0.99,
    "novelty_resolve_prob": 0.95,
    "novelty_margin": 0.02,
    "novelty_resolve_margin": 0.016,
}

# Domain of each firing/plain key: (lo, hi, lo_open, hi_open). Out of domain -> default.
_DOMAIN: dict[str, tuple[float, float, bool, bool]] = {
    "guardrail_prob": (0.0, 1.0, True, True),
    "decision_prob": (0.5, 1.0, True, True),
    "decision_rhat": (1.0, math.inf, False, True),
    "decision_ess": (0.0, math.inf, False, True),
    "srm_alpha": (0.0, 1.0, True, True),
    "srm_floor": (0.0, math.inf, False, True),
    "srm_concentration": (0.0, math.inf, True, True),
    "not_converged_rhat": (1.0, math.inf, False, True),
    "not_converged_min_iteration": (0.0, math.inf, False, True),
    "bias_prob": (0.0, 0.5, True, False),
    "bias_interval": (0.0, math.inf, True, True),
    "data_loss_share": (0.0, 1.0, True, True),
    "data_loss_min_events": (1.0, math.inf, False, True),
    "novelty_prob": (0.5, 1.0, True, True),
    "novelty_margin": (0.0, math.inf, False, True),
}

# resolve key -> (firing key, derived default from the firing level, clamp to non-firing side)
_RESOLVE: dict[str, tuple[str, Any, Any]] = {
    "guardrail_resolve_prob": ("guardrail_prob", lambda f: f - 0.05, min),
    "decision_resolve_prob": ("decision_prob", lambda f: max(0.5, f - 0.05), min),
    # wide: in a stream every new batch of data briefly raises R-hat (the draw
    # window still holds draws made on the older data); a decision should not
    # flap with each batch, only when the evidence or convergence really degrade
    "decision_resolve_rhat": ("decision_rhat", lambda f: f + 0.04, max),
    "decision_resolve_ess": ("decision_ess", lambda f: 0.5 * f, min),
    "srm_resolve_floor": ("srm_floor", lambda f: 0.8 * f, min),
    "not_converged_resolve_rhat": ("not_converged_rhat", lambda f: 1.0 + 0.6 * (f - 1.0), min),
    "bias_resolve_prob": ("bias_prob", lambda f: min(0.5, 2.0 * f), max),
    "bias_resolve_interval": ("bias_interval", lambda f: 0.9 * f, min),
    "data_loss_resolve_share": ("data_loss_share", lambda f: 0.5 * f, min),
    "novelty_resolve_prob": ("novelty_prob", lambda f: max(0.5, f - 0.04), min),
    "novelty_resolve_margin": ("novelty_margin", lambda f: 0.8 * f, min),
}


def _in_domain(key: str, v: float) -> bool:
    lo, hi, lo_open, hi_open = _DOMAIN[key]
    if not math.isfinite(v):
        return False
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


def thresholds(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """All threshold values: defaults, overridden by ``overrides`` (see the module table)."""
    given = dict(overrides or {})
    out: dict[str, float] = {}
    for key in _DOMAIN:
        v = given.get(key)
        ok = isinstance(v, int | float) and not isinstance(v, bool) and _in_domain(key, float(v))
        out[key] = float(v) if ok else DEFAULT_THRESHOLDS[key]  # type: ignore[arg-type]
    for key, (fire_key, derive, clamp) in _RESOLVE.items():
        fire = out[fire_key]
        v = given.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(clamp(float(v), fire))
        else:
            out[key] = float(clamp(round(derive(fire), 12), fire))
    return out


def unknown_threshold_keys(overrides: Mapping[str, float] | None) -> list[str]:
    """Keys of ``alert_thresholds`` this module does not read (for a registry warning)."""
    return sorted(k for k in (overrides or {}) if k not in DEFAULT_THRESHOLDS)


def alert_id(experiment_id: str, kind: str, metric: str | None = None,
             variant: str | None = None) -> str:
    """Stable id of a condition: ``experiment|kind|metric|variant`` (missing parts empty)."""
    return f"{experiment_id}|{kind}|{metric or ''}|{variant or ''}"


def initial_state() -> dict:
    """The state before the first evaluation (what to use when Redis holds none)."""
    return {"version": STATE_VERSION, "active": {}, "srm": None, "data_loss": None}


# --------------------------------------------------------------------------- helpers


def _num(x: Any) -> float | None:
    """A finite float, else None (JSON has no NaN; evidence must be numbers)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _evidence(**kv: Any) -> dict[str, float]:
    """Only the finite numbers: the alert schema's evidence holds numbers and nothing else."""
    out: dict[str, float] = {}
    for k, v in kv.items():
        f = _num(v)
        if f is not None:
            out[k] = f
    return out


def _phi(z: float) -> float:
    """Standard normal CDF (stdlib erfc, accurate in both tails)."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def _p_beyond(mean: float, sd: float | None, cut: float, upper: bool) -> float:
    """P(X > cut) (``upper``) or P(X < cut) for X ~ N(mean, sd); a point mass when sd is 0."""
    if sd is None or sd <= 0.0:
        return float(mean > cut) if upper else float(mean < cut)
    z = (cut - mean) / sd
    return _phi(-z) if upper else _phi(z)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def _fmt_effect(x: float | None, kind: str) -> str:
    """An effect (or a threshold on one) in its kind's units, so a guardrail
    message reads as the dashboard does: percentage points for a conversion,
    the plain difference of ratios for a ratio, metric units for a sum."""
    if x is None:
        return "n/a"
    if kind == "conversion":
        return f"{100.0 * x:.3g} pp"
    return f"{x:.3g}"


#: what a guardrail threshold g means, per metric kind (the message's words)
_EFFECT_UNITS = {"conversion": "percentage points of conversion rate",
                 "ratio": "difference of the ratio between arms"}


class _Decision:
    """One condition evaluated on one record: firing now (None = no information), why."""

    __slots__ = ("evidence", "firing", "message")

    def __init__(self, firing: bool | None, evidence: dict[str, float], message: str):
        self.firing = firing
        self.evidence = evidence
        self.message = message


# --------------------------------------------------------------------------- conditions


def _guardrail(rec: dict, spec: MetricSpec, was: bool, t: dict[str, float]) -> _Decision:
    eff = rec["adjusted"]["effect"]
    mean, sd = _num(eff.get("mean")), _num(eff.get("sd"))
    g = abs(float(spec.guardrail_threshold))  # type: ignore[arg-type]
    bad_up = spec.direction == "decrease"  # the bad direction is up when good is down
    if mean is None:
        return _Decision(None, {}, "")
    cut = g if bad_up else -g
    p = _p_beyond(mean, sd, cut, upper=bad_up)
    level = t["guardrail_resolve_prob"] if was else t["guardrail_prob"]
    firing = p >= level if was else p > level
    ev = _evidence(p_breach=p, threshold=cut, level=level, effect_mean=mean, effect_sd=sd,
                   effect_lo=eff.get("lo"), effect_hi=eff.get("hi"),
                   rhat=rec["diagnostics"].get("rhat"))
    side = "above" if bad_up else "below"
    kind = spec.kind

    def fx(x: Any) -> str:
        return _fmt_effect(_num(x), kind)

    units = f" ({_EFFECT_UNITS[kind]})" if kind in _EFFECT_UNITS else ""
    if firing:
        msg = (f"Guardrail breach: {rec['variant']} moves {rec['metric']} {side} {fx(cut)}"
               f"{units} with probability {p:.3f} (adjusted effect {fx(mean)}, "
               f"95% interval [{fx(eff.get('lo'))}, {fx(eff.get('hi'))}]).")
    else:
        msg = (f"Guardrail on {rec['metric']} for {rec['variant']} is no longer breached: "
               f"P(effect {side} {fx(cut)}{units}) = {p:.3f}, under {level:g}.")
    return _Decision(firing, ev, msg)


def _decision(rec: dict, spec: MetricSpec, was: bool, t: dict[str, float]) -> _Decision:
    """``decision_ready`` is the record's always-valid ``decision.ready``
    (issue 27; ``streams.sampling.decisions``): no threshold of its own, and a
    decision once made stays made, so the alert fires once and does not flap.
    Records without a ``decision`` (written before it existed) change nothing."""
    dec = rec.get("decision")
    if not isinstance(dec, dict) or "ready" not in dec:
        return _Decision(None, {}, "")
    ready = bool(dec["ready"])
    cs = dec.get("cs") or {}
    eff = rec["adjusted"]["effect"]
    ev = _evidence(alpha=dec.get("alpha"), level=dec.get("level"), cs_lo=cs.get("lo"),
                   cs_hi=cs.get("hi"), e_value=dec.get("evidence"), looks=dec.get("looks"),
                   since=dec.get("since"), effect_mean=eff.get("mean"), effect_lo=eff.get("lo"),
                   effect_hi=eff.get("hi"), p_positive=rec["adjusted"].get("p_positive"),
                   expected_loss=rec["adjusted"].get("expected_loss"))
    if ready:
        msg = (f"Decision ready: {rec['variant']} is {dec.get('direction')} than "
               f"{rec['control']} on {rec['metric']} by {dec.get('rule')} at alpha "
               f"{_fmt(dec.get('alpha'))} (level {_fmt(dec.get('level'))}): confidence "
               f"sequence [{_fmt(cs.get('lo'))}, {_fmt(cs.get('hi'))}] after "
               f"{dec.get('looks')} looks, e-value {_fmt(dec.get('evidence'))} "
               f"(adjusted effect {_fmt(eff.get('mean'))}, 95% posterior interval "
               f"[{_fmt(eff.get('lo'))}, {_fmt(eff.get('hi'))}]).")
    else:
        msg = (f"No longer decision ready: {rec['metric']}/{rec['variant']} has no decision "
               f"(its decision state was reset).")
    return _Decision(ready, ev, msg)


def _not_converged(rec: dict, spec: MetricSpec, was: bool, t: dict[str, float]) -> _Decision:
    diag = rec["diagnostics"]
    rhat, it = _num(diag.get("rhat")), _num(diag.get("iteration"))
    if rhat is None or it is None:
        return _Decision(None, {}, "")
    lim = t["not_converged_resolve_rhat"] if was else t["not_converged_rhat"]
    firing = it >= t["not_converged_min_iteration"] and rhat > lim
    ev = _evidence(rhat=rhat, rhat_limit=lim, iteration=it,
                   min_iteration=t["not_converged_min_iteration"],
                   ess_bulk=diag.get("ess_bulk"), ess_tail=diag.get("ess_tail"))
    if firing:
        msg = (f"Not converged: R-hat of {rec['metric']}/{rec['variant']} is {rhat:.3f} "
               f"(limit {lim:g}) after {int(it)} sweeps, so its estimate is not yet reliable.")
    else:
        msg = (f"Converged again: R-hat of {rec['metric']}/{rec['variant']} is {rhat:.3f}, "
               f"at most {lim:g}.")
    return _Decision(firing, ev, msg)


def _bias(rec: dict, spec: MetricSpec, was: bool, t: dict[str, float]) -> _Decision:
    if rec.get("adjustment") != "stratified":
        return _Decision(False, {}, "")  # adjusted == naive by construction
    adj, nv = rec["adjusted"], rec["naive"]["effect"]
    eff = adj["effect"]
    m, lo, hi = _num(eff.get("mean")), _num(eff.get("lo")), _num(eff.get("hi"))
    nm, pp = _num(nv.get("mean")), _num(adj.get("p_positive"))
    if m is None or lo is None or hi is None or nm is None:
        return _Decision(None, {}, "")
    # distance of the naive mean from the adjusted mean in half-widths on its side
    half = (hi - m) if nm >= m else (m - lo)
    dist = abs(nm - m) / half if half > 0 else (0.0 if nm == m else math.inf)
    # adjusted posterior mass on the naive mean's side of zero
    side_mass = None
    if pp is not None and nm != 0.0:
        side_mass = pp if nm > 0 else 1.0 - pp
    ilim = t["bias_resolve_interval"] if was else t["bias_interval"]
    plim = t["bias_resolve_prob"] if was else t["bias_prob"]
    outside = dist > ilim
    opposite = side_mass is not None and side_mass < plim
    firing = outside or opposite
    ev = _evidence(naive_mean=nm, adjusted_mean=m, adjusted_lo=lo, adjusted_hi=hi,
                   interval_distance=dist if math.isfinite(dist) else None,
                   interval_limit=ilim, adjusted_mass_on_naive_side=side_mass,
                   mass_limit=plim, adjusted_sd=eff.get("sd"), naive_sd=nv.get("sd"))
    if firing:
        why = (f"lies outside the adjusted 95% interval [{_fmt(lo)}, {_fmt(hi)}]" if outside
               else f"is on a side of zero that the adjusted posterior gives only "
               f"{_pct(side_mass or 0.0)}")
        msg = (f"Early-adopter bias: the naive effect of {rec['variant']} on {rec['metric']} "
               f"({_fmt(nm)}) {why} (population-adjusted mean {_fmt(m)}), so the running "
               f"average reflects who arrived first.")
    else:
        msg = (f"Naive and adjusted effects of {rec['variant']} on {rec['metric']} agree again "
               f"(naive {_fmt(nm)}, adjusted {_fmt(m)} [{_fmt(lo)}, {_fmt(hi)}]).")
    return _Decision(firing, ev, msg)


def _novelty(rec: dict, spec: MetricSpec, was: bool, t: dict[str, float]) -> _Decision:
    nov = rec.get("novelty")
    if not nov:
        return _Decision(False, {}, "")  # no exposure-age bins: nothing to judge
    c = nov.get("contrast") or {}
    p, m = _num(nov.get("p_positive")), _num(c.get("mean"))
    if p is None or m is None:
        return _Decision(None, {}, "")
    plim = t["novelty_resolve_prob"] if was else t["novelty_prob"]
    mlim = t["novelty_resolve_margin"] if was else t["novelty_margin"]
    sure = (p >= plim or p <= 1.0 - plim) if was else (p > plim or p < 1.0 - plim)
    big = abs(m) >= mlim if was else abs(m) > mlim
    firing = sure and big
    d = nov.get("difference") or {}
    ev = _evidence(p_positive=p, contrast_mean=m, contrast_sd=c.get("sd"),
                   contrast_lo=c.get("lo"), contrast_hi=c.get("hi"), prob_limit=plim,
                   margin=mlim, difference_mean=d.get("mean"), difference_sd=d.get("sd"),
                   strata_used=c.get("strata_used"))
    kind = "novelty" if m > 0 else "primacy"
    if firing:
        better = "better" if m > 0 else "worse"
        msg = (f"{kind.capitalize()} effect: {rec['variant']} lifts {rec['metric']} "
               f"{_fmt(m)} {better} on a unit's first days since exposure than later, "
               f"within activity strata (95% interval [{_fmt(c.get('lo'))}, "
               f"{_fmt(c.get('hi'))}], P(novelty) = {p:.3f}); the long-run lift is the "
               f"later bins' (by_exposure_age).")
    else:
        msg = (f"No clear novelty or primacy of {rec['variant']} on {rec['metric']} any more "
               f"(first-days minus later lift {_fmt(m)}, P(novelty) = {p:.3f}).")
    return _Decision(firing, ev, msg)


_EXPERIMENT_LEVEL = frozenset(("sample_ratio_mismatch", "data_loss"))

_PER_RECORD = (
    ("guardrail_breach", _guardrail),
    ("decision_ready", _decision),
    ("not_converged", _not_converged),
    ("early_adopter_bias", _bias),
    ("novelty_effect", _novelty),
)


def _srm(config: ExperimentConfig, rec: dict, srm_state: dict | None, was: bool,
         t: dict[str, float]) -> tuple[_Decision, dict | None]:
    """The experiment-level SRM decision and the new SRM state (running max of log BF)."""
    variants = list(config.variants)
    k = len(variants)
    if k < 2:
        return _Decision(False, {}, ""), srm_state
    alloc = list(config.allocation) if config.allocation is not None else [1.0 / k] * k
    s = sum(alloc)
    alloc = [a / s for a in alloc]
    exposed = rec.get("units", {}).get("exposed", {}) or {}
    counts = [int(exposed.get(v, 0) or 0) for v in variants]
    n = sum(counts)
    same_null = (srm_state is not None and srm_state.get("variants") == variants
                 and srm_state.get("allocation") == alloc
                 and srm_state.get("concentration") == t["srm_concentration"])
    lmax = float(srm_state.get("log_bf_max", 0.0)) if same_null else 0.0  # type: ignore[union-attr]
    if n == 0:
        new_state = {"variants": variants, "allocation": alloc,
                     "concentration": t["srm_concentration"], "log_bf_max": lmax, "n": 0}
        return _Decision(None, {}, ""), new_state
    lbf = log_bayes_factor(counts, alloc, t["srm_concentration"])
    lmax = max(lmax, lbf)
    new_state = {"variants": variants, "allocation": alloc,
                 "concentration": t["srm_concentration"], "log_bf_max": lmax, "n": n}
    shares = [c / n for c in counts]
    rel = max(abs(sh / a - 1.0) for sh, a in zip(shares, alloc, strict=True))
    absdev = max(abs(sh - a) for sh, a in zip(shares, alloc, strict=True))
    floor = t["srm_resolve_floor"] if was else t["srm_floor"]
    significant = lmax >= math.log(1.0 / t["srm_alpha"])
    practical = rel > floor
    firing = significant and practical
    p_value = min(1.0, math.exp(-lmax))
    ev = _evidence(n=n, p_value=p_value, log_e_value=lbf, log_e_value_max=lmax,
                   alpha=t["srm_alpha"], max_rel_deviation=rel, max_abs_deviation=absdev,
                   floor=floor)
    for v, c, sh, a in zip(variants, counts, shares, alloc, strict=True):
        ev[f"count.{v}"] = float(c)
        ev[f"share.{v}"] = sh
        ev[f"allocation.{v}"] = a
    split = " / ".join(f"{v} {_pct(sh)}" for v, sh in zip(variants, shares, strict=True))
    want = " / ".join(_pct(a) for a in alloc)
    if firing:
        msg = (f"Sample-ratio mismatch: exposures split {split} over {n} units against the "
               f"configured {want} (anytime-valid p = {p_value:.2g}, largest deviation "
               f"{_pct(rel)} of an arm), so assignment or logging is losing units.")
    elif significant:
        msg = (f"Sample-ratio mismatch cleared: exposures now split {split}, within "
               f"{_pct(floor)} of the configured {want} for every arm.")
    else:
        msg = f"Exposures split {split} are consistent with the configured {want}."
    return _Decision(firing, ev, msg), new_state


# the counters of data_quality.dropped (streams.state.semantics.DROPPED); dead letters are the rest
_LOSS_PARTS = ("late", "expired", "too_old")


def _loss_totals(dq: Any) -> dict[str, int] | None:
    """events, dropped and the dropped parts of a record's ``data_quality``;
    None when it is missing or malformed (no information)."""
    if not isinstance(dq, Mapping):
        return None
    out: dict[str, int] = {}
    for key in ("events", "dropped", *_LOSS_PARTS):
        v = dq.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return None
        out[key] = v
    # the dead letters in ``dropped`` (those not also counted by a counter)
    out["dead_letters"] = out["dropped"] - sum(out[k] for k in _LOSS_PARTS)
    return out


def _data_loss(rec: dict, loss_state: dict | None, was: bool, t: dict[str, float]
               ) -> tuple[_Decision, dict | None]:
    """The experiment-level data_loss decision and the new marks (module docstring)."""
    cur = _loss_totals(rec.get("data_quality"))
    if cur is None:
        return _Decision(None, {}, ""), loss_state
    zero = {k: 0 for k in cur}
    marks = [dict(m) for m in (loss_state or {}).get("marks") or []
             if isinstance(m, Mapping) and all(isinstance(m.get(k), int) for k in cur)]
    if not marks or cur["events"] < marks[-1]["events"] or cur["dropped"] < marks[-1]["dropped"]:
        marks = [zero]  # first evaluation, or the totals restarted
    min_n = t["data_loss_min_events"]
    base = None
    for i in range(len(marks) - 1, -1, -1):
        if cur["events"] - marks[i]["events"] >= min_n:
            base = i
            break
    if base is not None:
        marks = marks[base:]  # older marks can never start a window again
    if cur["events"] - marks[-1]["events"] >= max(1.0, min_n / 4.0):
        marks.append(dict(cur))
    new_state = {"marks": marks}
    if base is None:
        return _Decision(None, {}, ""), new_state
    w = {k: cur[k] - marks[0][k] for k in cur}
    share = min(1.0, w["dropped"] / w["events"])
    level = t["data_loss_resolve_share"] if was else t["data_loss_share"]
    firing = share > level
    dq = rec["data_quality"]
    ev = _evidence(window_events=w["events"], window_dropped=w["dropped"], window_share=share,
                   level=level, min_events=min_n, events=cur["events"], dropped=cur["dropped"],
                   dropped_share=dq.get("dropped_share"))
    for k in (*_LOSS_PARTS, "dead_letters"):
        ev[f"window_{k}"] = float(w[k])
    parts = (f"late {w['late']}, expired {w['expired']}, too old {w['too_old']}, "
             f"dead letters {w['dead_letters']}")
    if firing:
        msg = (f"Data loss: {_pct(share)} of the last {w['events']} events were dropped "
               f"({parts}), over the {100 * level:g}% limit, so the estimate misses them.")
    else:
        msg = (f"Data loss stopped: {_pct(share)} of the last {w['events']} events were "
               f"dropped ({parts}), at most {100 * level:g}%.")
    return _Decision(firing, ev, msg), new_state


# --------------------------------------------------------------------------- evaluate


def _record_time(rec: dict) -> tuple[int, int]:
    return (int(rec.get("watermark", {}).get("event_time") or 0), int(rec.get("computed_at") or 0))


def _alert(config: ExperimentConfig, kind: str, metric: str | None, variant: str | None,
           state: str, evidence: dict[str, float], message: str, watermark: int,
           now_ms: int) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "alert_id": alert_id(config.experiment_id, kind, metric, variant),
        "experiment_id": config.experiment_id,
        "metric": metric,
        "variant": variant,
        "kind": kind,
        "state": state,
        "evidence": evidence,
        "message": message,
        "watermark": {"event_time": int(watermark)},
        "created_at": int(now_ms),
    }


def evaluate(config: ExperimentConfig, records_for_experiment: Iterable[dict],
             previous_state: Mapping[str, Any] | None, now_ms: int
             ) -> tuple[list[dict], dict]:
    """Alerts to emit for one experiment after a tick, and the state to store.

    ``records_for_experiment``: estimate records (``streams.sampling.problems.records``);
    records of other experiments are ignored, and of several records for one
    (metric, variant) the latest (watermark, computed_at) counts.
    ``previous_state``: what the previous call returned (None or ``{}`` for
    none); it is JSON-able, only read, never mutated. ``now_ms`` stamps
    ``created_at`` (no clock is read here, so the function is deterministic).
    Returns the firing/resolved alert records, sorted by ``alert_id``, and the
    new state.
    """
    t = thresholds(config.alert_thresholds)
    prev = dict(previous_state or {})
    active: dict[str, dict] = {k: dict(v) for k, v in (prev.get("active") or {}).items()}
    srm_state = prev.get("srm")
    loss_state = prev.get("data_loss")
    latest: dict[tuple[str, str], dict] = {}
    for rec in records_for_experiment:
        if rec.get("experiment_id") != config.experiment_id:
            continue
        key = (rec["metric"], rec["variant"])
        if key not in latest or _record_time(rec) >= _record_time(latest[key]):
            latest[key] = rec
    specs = {m.name: m for m in config.metrics}
    out: list[dict] = []

    def transition(kind: str, metric: str | None, variant: str | None, d: _Decision,
                   watermark: int) -> None:
        aid = alert_id(config.experiment_id, kind, metric, variant)
        was = aid in active
        if d.firing is None or d.firing == was:
            return
        state = "firing" if d.firing else "resolved"
        out.append(_alert(config, kind, metric, variant, state, d.evidence, d.message,
                          watermark, now_ms))
        if d.firing:
            active[aid] = {"kind": kind, "metric": metric, "variant": variant,
                           "since": int(now_ms), "watermark": int(watermark),
                           "evidence": d.evidence}
        else:
            del active[aid]

    for (metric, variant), rec in sorted(latest.items()):
        spec = specs.get(metric)
        if spec is None or variant not in config.treatments:
            continue  # handled below as no longer configured
        wm = _record_time(rec)[0]
        for kind, fn in _PER_RECORD:
            if kind == "guardrail_breach" and spec.guardrail_threshold is None:
                continue
            aid = alert_id(config.experiment_id, kind, metric, variant)
            transition(kind, metric, variant, fn(rec, spec, aid in active, t), wm)

    if latest:
        newest = max(latest.values(), key=_record_time)
        aid = alert_id(config.experiment_id, "sample_ratio_mismatch")
        d, srm_state = _srm(config, newest, srm_state, aid in active, t)
        transition("sample_ratio_mismatch", None, None, d, _record_time(newest)[0])
        # experiment-level too: the newest record that carries data_quality
        with_dq = [r for r in latest.values() if "data_quality" in r]
        if with_dq:
            newest = max(with_dq, key=_record_time)
            aid = alert_id(config.experiment_id, "data_loss")
            d, loss_state = _data_loss(newest, loss_state, aid in active, t)
            transition("data_loss", None, None, d, _record_time(newest)[0])

    # alerts about things the configuration no longer has resolve explicitly
    for aid, a in sorted(active.items()):
        kind, metric, variant = a["kind"], a.get("metric"), a.get("variant")
        if kind in _EXPERIMENT_LEVEL:
            continue
        spec = specs.get(metric) if metric is not None else None
        gone = (spec is None or variant not in config.treatments
                or (kind == "guardrail_breach" and spec.guardrail_threshold is None))
        if gone:
            what = (f"metric {metric}" if spec is None else f"variant {variant}"
                    if variant not in config.treatments else f"the guardrail on {metric}")
            out.append(_alert(config, kind, metric, variant, "resolved", {},
                              f"Resolved because {what} is no longer in the experiment's "
                              f"configuration.", int(a.get("watermark", 0)), now_ms))
            del active[aid]

    out.sort(key=lambda r: (r["alert_id"], r["state"]))
    return out, {"version": STATE_VERSION, "active": active, "srm": srm_state,
                 "data_loss": loss_state}
