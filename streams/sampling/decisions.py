"""Always-valid decisions of an experiment's estimates (issue 27; docs/method.md §8).

One *look* per completed step of ``look_seconds`` of the estimates' data
time (the snapshot watermark since ``started_at``), evaluated on the first
estimate whose watermark reaches the step: the sequence of looks depends on
the data's own time, never on how often a worker ticks, so ``liftstream
analyze`` recomputes it (``streams.sampling.analyze.analyze_with_looks``). A worker that
falls behind and skips steps looks fewer times: still valid (a confidence
sequence holds at any subset of looks), only a little wider.

Per (metric, treatment) the state keeps the running intersection of the
normal-mixture confidence sequence and the e-values (``kernels.decision``).
The rules (the record's ``decision.rule`` says which decided):

* **primary** (config ``primary``, default the first metric): ready when the
  running intersection of its sequence at level α/K (K treatment arms,
  Bonferroni) excludes 0;
* **secondary** (every other metric × arm): only once a primary arm is
  ready (the gate: serial gatekeeping), by e-BH at level α over all
  secondary pairs' e-values of the look. Under the global null nothing
  passes the gate but with probability ≤ α, so the chance of *any* false
  decision in the experiment stays ≤ α;
* once ready, a decision stays (``since`` = the data time of that look).

Pure functions over JSON-able state; the sampler stores it per experiment
(``streams.state.keys.decision_key``) beside the estimates, so a restart
continues it.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np

from kernels import decision as dk
from kernels.data import per_bucket_prob
from streams.sampling.problems import _activity, effect_cells
from streams.state.semantics import ExperimentSnapshot

STATE_VERSION = 1
#: the forecast's horizon, in buckets, and the buckets ahead it reports P(ready by)
FORECAST_BUCKETS = 28
REPORT_AHEAD = (1, 2, 3, 7, 14, 28)
FORECAST_PATHS = 1000
#: a pair is looked at once both its arms have this many matured units
MIN_MATURED = 2

RULE_PRIMARY = "primary: normal-mixture confidence sequence, running intersection"
RULE_SECONDARY = "secondary: e-BH over the other metrics x arms, once the primary is decided"


def initial_state() -> dict:
    """The state before any look."""
    return {"version": STATE_VERSION, "step": None, "gate": None, "pairs": {}}


def look_step(snap: ExperimentSnapshot) -> int | None:
    """The look step of the snapshot's data time: ⌊(watermark − started_at) /
    look⌋, None before the experiment has a start and a watermark past it."""
    if snap.started_at is None or snap.watermark is None or snap.watermark < snap.started_at:
        return None
    return (snap.watermark - snap.started_at) // (snap.config.look_seconds * 1000)


def _pair_key(rec: dict) -> str:
    return f"{rec['metric']}:{rec['variant']}"


def _finite(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _eligible(rec: dict) -> tuple[float, float] | None:
    """(mean, sd) of the adjusted effect when the record may be looked at:
    a completed bucket (before it there is no arrival model, and the
    "adjusted" effect is the early adopters' own) and matured units in both
    arms (before that the estimate is the prior's)."""
    if (rec.get("watermark") or {}).get("completed_buckets", 0) < 1:
        return None
    matured = (rec.get("units") or {}).get("matured") or {}
    if min(matured.get(rec["control"], 0), matured.get(rec["variant"], 0)) < MIN_MATURED:
        return None
    eff = rec["adjusted"]["effect"]
    m, s = _finite(eff.get("mean")), _finite(eff.get("sd"))
    if m is None or s is None or s <= 0:
        return None
    return m, s


def _cells(snap: ExperimentSnapshot, metric: str) -> np.ndarray:
    """[K1, S_total, 3] (n, Σy, Σy²) of the metric's cells, in the units of
    its effect (a ratio's linearized L / D̄: ``problems.effect_cells``)."""
    return np.array(effect_cells(snap, metric), float)


def _mixing_sd(cfg, snap: ExperimentSnapshot, rec: dict) -> float:
    """The mixture's scale: the config's minimal effect (absolute, or relative
    × the control mean now), else the model's prior scale on θ (the pooled
    outcome sd, ``kernels.data.scaled_hyper``)."""
    if cfg.mde is not None:
        return float(cfg.mde)
    base = _finite((rec["adjusted"].get("baseline") or {}).get("mean"))
    if cfg.mde_relative is not None and base:
        return float(cfg.mde_relative) * abs(base)
    c = _cells(snap, rec["metric"])
    return float(dk.pooled_sd(c[..., 0], c[..., 1], c[..., 2]))


def _mde_abs(cfg, rec: dict) -> float | None:
    if cfg.mde is not None:
        return float(cfg.mde)
    base = _finite((rec["adjusted"].get("baseline") or {}).get("mean"))
    if cfg.mde_relative is not None and base:
        return float(cfg.mde_relative) * abs(base)
    return None


def _new_pair(cfg, snap: ExperimentSnapshot, rec: dict, primary: bool) -> dict:
    K = max(len(cfg.treatments), 1)
    level = cfg.decision_alpha / K if primary else cfg.decision_alpha
    return {"primary": primary, "alpha": cfg.decision_alpha, "level": level,
            "mixing_sd": _mixing_sd(cfg, snap, rec), "lo": None, "hi": None,
            "log_e": None, "log_e_max": None, "looks": 0, "ready": False,
            "direction": None, "since": None, "rule": None, "forecast": None}


def _direction(effect_sign: float, spec_direction: str) -> str:
    good = -1.0 if spec_direction == "decrease" else 1.0
    return "better" if effect_sign * good > 0 else "worse"


def decide(snap: ExperimentSnapshot, recs: list[dict], state: dict | None
           ) -> tuple[list[dict], dict, bool]:
    """Attach ``decision`` (and its ``forecast``) to one experiment's records,
    taking a look when their data time reached a new step.

    ``recs``: the experiment's records of one tick (one snapshot); ``state``:
    what the previous call returned (None: none yet). Returns the records
    (the same dicts, updated), the new state and whether a look was taken.
    """
    cfg = snap.config
    st = initial_state() if not state else {**state, "pairs": dict(state.get("pairs") or {})}
    step = look_step(snap)
    mine = [r for r in recs if r["experiment_id"] == snap.experiment_id]
    looked = step is not None and (st["step"] is None or step > st["step"]) and bool(mine)
    if looked:
        _look(cfg, snap, mine, st, step)
    for rec in mine:
        pair = st["pairs"].get(_pair_key(rec))
        rec["decision"] = _record_decision(cfg, rec, pair)
        rec["forecast"] = None if pair is None else pair.get("forecast")
    return recs, st, looked


def _look(cfg, snap: ExperimentSnapshot, recs: list[dict], st: dict, step: int) -> None:
    """One look at step ``step``: update every eligible pair, then the rules."""
    st["step"] = step
    wm = int(snap.watermark)  # type: ignore[arg-type]
    primary = cfg.primary_metric
    specs = {m.name: m for m in cfg.metrics}
    sec_keys, sec_log_e, sec_rec = [], [], []
    for rec in sorted(recs, key=_pair_key):
        if rec["metric"] not in specs or rec["variant"] not in cfg.treatments:
            continue
        key = _pair_key(rec)
        est = _eligible(rec)
        pair = st["pairs"].get(key)
        if est is None:
            continue
        if pair is None:
            pair = _new_pair(cfg, snap, rec, rec["metric"] == primary)
        else:
            pair = dict(pair)
        m, s = est
        inf = math.inf
        lo, hi, lem, le = dk.look(
            -inf if pair["lo"] is None else pair["lo"], inf if pair["hi"] is None else pair["hi"],
            -inf if pair["log_e_max"] is None else pair["log_e_max"], m, s,
            dk.mixing_precision(pair["mixing_sd"]), pair["level"])
        pair.update(lo=_finite(lo), hi=_finite(hi), log_e=_finite(le), log_e_max=_finite(lem),
                    looks=pair["looks"] + 1, mean=m, sd=s)
        if pair["primary"] and not pair["ready"] and dk.excludes_zero(lo, hi):
            sign = 1.0 if float(lo) > 0 else -1.0 if float(hi) < 0 else math.copysign(1.0, m)
            pair.update(ready=True, since=wm, rule=RULE_PRIMARY,
                        direction=_direction(sign, specs[rec["metric"]].direction))
        st["pairs"][key] = pair
        if not pair["primary"]:
            sec_keys.append(key)
            sec_log_e.append(pair["log_e"] if pair["log_e"] is not None else math.nan)
            sec_rec.append(rec)
    if st.get("gate") is None:
        since = [p["since"] for p in st["pairs"].values() if p["primary"] and p["ready"]]
        st["gate"] = min(since) if since else None
    if st["gate"] is not None and sec_keys:
        # every configured secondary pair counts in e-BH's m, looked at or not
        n_sec = (len(cfg.metrics) - 1) * len(cfg.treatments)
        log_e = np.full(max(n_sec, len(sec_keys)), np.nan)
        log_e[:len(sec_keys)] = sec_log_e
        rejected = dk.ebh(log_e, cfg.decision_alpha)[:len(sec_keys)]
        for key, rec, rej in zip(sec_keys, sec_rec, rejected, strict=True):
            pair = st["pairs"][key]
            if rej and not pair["ready"]:
                pair.update(ready=True, since=wm, rule=RULE_SECONDARY,
                            direction=_direction(math.copysign(1.0, pair["mean"]),
                                                 specs[rec["metric"]].direction))
    for rec in recs:
        pair = st["pairs"].get(_pair_key(rec))
        if pair is not None and pair.get("mean") is not None:
            try:
                pair["forecast"] = forecast_of(cfg, snap, rec, pair, step)
            except (ValueError, FloatingPointError, IndexError):
                pair["forecast"] = None  # a forecast must never stop a look


def _record_decision(cfg, rec: dict, pair: dict | None) -> dict:
    """The record's ``decision`` object from the pair's state."""
    primary = rec["metric"] == cfg.primary_metric
    if pair is None:
        return {"ready": False, "direction": None, "rule": None, "alpha": cfg.decision_alpha,
                "level": None, "primary": primary, "cs": {"lo": None, "hi": None},
                "evidence": None, "since": None, "looks": 0, "mixing_sd": None}
    lem = pair.get("log_e_max")
    return {"ready": bool(pair["ready"]), "direction": pair["direction"],
            "rule": pair["rule"] or (RULE_PRIMARY if pair["primary"] else RULE_SECONDARY),
            "alpha": pair["alpha"], "level": pair["level"], "primary": pair["primary"],
            "cs": {"lo": pair["lo"], "hi": pair["hi"]},
            "evidence": None if lem is None else math.exp(min(lem, 700.0)),
            "since": pair["since"], "looks": pair["looks"], "mixing_sd": pair["mixing_sd"]}


def forecast_of(cfg, snap: ExperimentSnapshot, rec: dict, pair: dict, step: int) -> dict:
    """``forecast`` of one pair at a look: the adjusted sd at the next
    buckets from the arrival model and the cells' per-unit variance
    (``kernels.decision.forecast``), the days (of data time from the
    watermark) until the sequence's half-width reaches the minimal effect,
    and P(ready by the end of bucket b) if the true effect is the minimal
    effect (in the direction the estimate leans), or, without one, under the
    posterior (predictive)."""
    strata = [row["stratum"] for row in rec["strata"]]
    v0 = snap.variants.index(cfg.control)
    v1 = snap.variants.index(rec["variant"])
    cells = _cells(snap, rec["metric"])[[v0, v1]][:, strata]  # [2, S, 3]
    n, sy, syy = cells[..., 0], cells[..., 1], cells[..., 2]
    pooled = float(dk.pooled_sd(n, sy, syy)) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(n >= 2, (syy - sy * sy / np.maximum(n, 1)) / np.maximum(n - 1, 1), pooled)
    var = np.where(np.isfinite(var) & (var > 0), var, pooled)
    share = np.array([(row["share_population"] or {}).get("mean") or 0.0 for row in rec["strata"]])
    if share.sum() <= 0:
        share = n.sum(0) / max(n.sum(), 1.0)
    D = int(snap.D)
    arrivals = np.array([[snap.arrivals[s].get(d, 0) for d in range(D)] for s in strata],
                        float).reshape(len(strata), D)
    bdays = cfg.bucket_seconds / 86_400
    act = np.array([_activity(snap, s) for s in strata])
    p0 = per_bucket_prob(act, bdays)
    lag = (cfg.window_seconds + cfg.lateness_seconds) / cfg.bucket_seconds
    stop = None if cfg.end_at is None else (cfg.end_at - snap.started_at) // (
        cfg.bucket_seconds * 1000)
    mde = _mde_abs(cfg, rec)
    m, s = pair["mean"], pair["sd"]
    theta = None if mde is None else math.copysign(mde, m if m != 0 else 1.0)
    per_bucket = max(1, min(24, cfg.bucket_seconds // cfg.look_seconds))
    rho = float(dk.mixing_precision(pair["mixing_sd"]))
    fc = dk.forecast(m, s, n, var, share, arrivals, D, np.log(p0) - np.log1p(-p0),
                     cfg.prior_sd_logit_p, lag, FORECAST_BUCKETS, rho, pair["level"], theta,
                     looks_per_bucket=per_bucket, stop_bucket=stop, already=pair["ready"],
                     paths=FORECAST_PATHS,
                     seed=zlib.crc32(f"{rec['metric']}:{rec['variant']}:{step}".encode()))
    elapsed = (snap.watermark - snap.started_at) / 86_400_000
    days = None
    if mde is not None:
        if dk.half_width(s, rho, pair["level"]) <= mde:
            days = 0.0
        else:
            j = dk.time_to_width(fc["sd"], rho, pair["level"], mde)
            days = None if j is None else max(0.0, (D + j + 1) * bdays - elapsed)
    return {"days_to_width": days, "mde": mde, "bucket_seconds": cfg.bucket_seconds,
            "sd_by": {str(D + j): float(fc["sd"][j - 1]) for j in REPORT_AHEAD
                      if j <= FORECAST_BUCKETS},
            "p_ready_by": {str(D + j): float(fc["p_ready"][j - 1]) for j in REPORT_AHEAD
                           if j <= FORECAST_BUCKETS}}
