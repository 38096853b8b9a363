"""Estimate records built by hand, for the alert rules' tests
(``tests/unit/alerts/test_alerts.py``, ``tests/integration/test_event_time.py``)."""

from __future__ import annotations

import math

import jsonschema

from schemas.contracts import load_schema

ESTIMATE_SCHEMA = jsonschema.Draft202012Validator(load_schema("estimate"))
WM = 1_700_000_000_000


def record(metric: str = "revenue", variant: str = "treatment", *,
           mean: float = 0.1, sd: float = 0.1, lo: float | None = None,
           hi: float | None = None, p_positive: float = 0.8,
           naive_mean: float | None = None, rhat: float | None = 1.001,
           ess: float | None = 1000.0, iteration: int = 5000,
           exposed: dict | None = None, adjustment: str = "stratified",
           watermark: int = WM, computed_at: int = WM + 1000,
           experiment_id: str = "exp-1", dq: dict | None = None,
           novelty: tuple[float, float] | None = None, ready: bool | None = None,
           direction: str | None = None) -> dict:
    """An estimate record shaped like ``streams.sampling.problems.records`` output."""
    lo = mean - 1.96 * sd if lo is None else lo
    hi = mean + 1.96 * sd if hi is None else hi
    nm = mean if naive_mean is None else naive_mean
    interval = {"mean": mean, "sd": sd, "lo": lo, "hi": hi}
    rec = {
        "schema_version": 1,
        "experiment_id": experiment_id,
        "metric": metric,
        "variant": variant,
        "control": "control",
        "adjustment": adjustment,
        "adjusted": {"effect": interval, "lift": {"mean": None, "sd": None, "lo": None, "hi": None},
                     "p_positive": p_positive, "expected_loss": 0.01},
        "naive": {"effect": {"mean": nm, "sd": sd * 0.8, "lo": nm - 1.6 * sd, "hi": nm + 1.6 * sd},
                  "lift": {"mean": None, "sd": None, "lo": None, "hi": None},
                  "p_positive": 0.5},
        "strata": [],
        "units": {"exposed": exposed or {"control": 5000, "treatment": 5000},
                  "matured": {"control": 4000, "treatment": 4000}},
        "diagnostics": {"rhat": rhat, "ess_bulk": ess, "ess_tail": ess, "chains": 8,
                        "draws": 4000, "iteration": iteration},
        "watermark": {"event_time": watermark, "completed_buckets": 3},
        "computed_at": computed_at,
    }
    if dq is not None:
        rec["data_quality"] = dq
    if novelty is not None:  # (contrast mean, its sd): p_positive from the normal posterior
        m, s = novelty
        p = 0.5 * math.erfc(-m / s / math.sqrt(2.0))
        block = {"mean": m, "sd": s, "lo": m - 1.96 * s, "hi": m + 1.96 * s}
        rec["novelty"] = {"difference": dict(block), "p_positive": p,
                          "contrast": {**block, "strata_used": 20}, "strata": 30}
    if ready is not None:  # the always-valid decision (issue 27)
        rec["decision"] = {
            "ready": ready, "direction": (direction or ("better" if mean > 0 else "worse"))
            if ready else None,
            "rule": "primary: normal-mixture confidence sequence, running intersection",
            "alpha": 0.05, "level": 0.05, "primary": True,
            "cs": {"lo": mean - 3 * sd, "hi": mean + 3 * sd}, "evidence": 25.0 if ready else 1.5,
            "since": watermark if ready else None, "looks": 40, "mixing_sd": 1.0}
    ESTIMATE_SCHEMA.validate(rec)
    return rec


def quiet(**kw) -> dict:
    """A record about which no other kind has anything to say."""
    return record(p_positive=0.6, **kw)
