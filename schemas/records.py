"""Typed records of the event and experiment contracts (docs/architecture.md#contracts).

These are plain frozen dataclasses: what every other layer passes around once
bytes have been validated (see ``schemas.validate``). Pure stdlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_STRATA_EDGES: tuple[float, ...] = (0, 1, 2, 4, 8, 15, 22, 29)
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Exposure:
    """A unit's exposure to a variant. The first one per (experiment, unit) counts."""

    event_id: str
    experiment_id: str
    unit_id: str
    variant: str
    ts: int  # epoch ms, event time
    pre_activity: float | None = None  # active days in the 28 days before (0..28)
    #: CUPED covariates (issue 18): metric name -> the unit's value of that
    #: metric over a pre-experiment period; None (or absent) = none. Names that
    #: are not metrics of the experiment are ignored by the state
    pre: dict[str, float] | None = None
    type: str = "exposure"


@dataclass(frozen=True, slots=True)
class Metric:
    """A metric observation. Without experiment_id it counts for every experiment
    the unit is exposed in, inside that unit's window [exposure_ts, exposure_ts + W)."""

    event_id: str
    unit_id: str
    metric: str
    value: float
    ts: int
    experiment_id: str | None = None
    type: str = "metric"


Event = Exposure | Metric


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A metric of an experiment. ``direction`` is the good direction;
    a guardrail alerts when the effect is beyond ``guardrail_threshold`` in the bad one."""

    name: str
    direction: str = "increase"  # "increase" | "decrease"
    guardrail_threshold: float | None = None
    # STUB of the kinds-state API (issue 26 contract §1): names and defaults only
    kind: str = "sum"
    threshold: float = 0.0
    numerator: str | None = None
    denominator: str | None = None
    cap_lower: float | None = None
    cap_upper: float | None = None


PRIORS = ("flat", "platform")
#: ``ExperimentConfig.exposure_age_bins`` when unset: the first day since
#: exposure, days 1-3, then the rest of the window (seconds)
DEFAULT_EXPOSURE_AGE_BINS = (0, 86_400, 259_200)
#: ``ExperimentConfig.covariates``: "auto" = the model uses the units'
#: pre-experiment values (``Exposure.pre``) where there are any, "off" = never
COVARIATES = ("auto", "off")


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    """Experiment registry record (topic ``liftstream.experiments``, key = id)."""

    experiment_id: str
    variants: tuple[str, ...] = ("control", "treatment")
    control: str = "control"
    metrics: tuple[MetricSpec, ...] = (MetricSpec("value"),)
    strata_edges: tuple[float, ...] = DEFAULT_STRATA_EDGES
    bucket_seconds: int = 86_400
    window_seconds: int = 7 * 86_400
    #: L: a unit matures when its source partition's clock (max event ts seen
    #: on the partition) minus L passes its window close (docs/architecture.md#state)
    lateness_seconds: int = 300
    dedupe_seconds: int = 86_400
    #: H: an in-window metric arriving after its unit matured corrects the
    #: matured cell until the partition clock minus L passes close + H; later
    #: it is dropped (``late``), and an exposure already that old is ``too_old``
    correction_seconds: int = 7 * 86_400
    #: metrics that arrive before their unit's exposure are held per unit for
    #: at most ``hold_seconds`` of event time and ``hold_max`` metrics a unit
    hold_seconds: int = 86_400
    hold_max: int = 64
    started_at: int | None = None  # epoch ms; else the first exposure's ts
    #: epoch ms: exposures at or after it are counted ``after_end`` and not
    #: applied (units exposed before keep their metrics until their windows
    #: close); ``liftstream experiments stop`` sets it with status "stopped"
    end_at: int | None = None
    target_shares: tuple[float, ...] | None = None  # per stratum, sums to 1
    allocation: tuple[float, ...] | None = None  # expected exposure share per variant
    alert_thresholds: dict[str, float] = field(default_factory=dict)
    status: str = "running"  # "running" | "stopped"
    prior_sd_logit_p: float = 0.5
    #: "flat": each experiment on its own; "platform": also shrunk towards the
    #: prior learned from all opted-in experiments sharing a metric (issue 7)
    prior: str = "flat"
    #: CUPED (issue 18): "auto" | "off" (see ``COVARIATES``). The state records
    #: the units' pre-experiment values either way; only the model reads this
    covariates: str = "auto"
    #: Novelty/primacy (issue 19): edges, in seconds since the unit's own
    #: exposure, of the age bins its metric totals are also kept by. None =
    #: the default ``DEFAULT_EXPOSURE_AGE_BINS`` (0, 1 d, 3 d) then the window;
    #: edges at or beyond the window are dropped and the window closes the
    #: last bin (``streams.state.semantics.age_edges_ms``). Fewer than two bins: off
    exposure_age_bins: tuple[int, ...] | None = None
    #: Decisions (issue 27; docs/method.md §8): the metric the experiment is
    #: decided on (None = the first); the others are decided only once it is,
    #: together, by e-BH
    primary: str | None = None
    #: the minimal effect of interest, in metric units (``mde``) or as a lift
    #: (``mde_relative``; at most one): the confidence sequence's mixing scale
    #: and the forecast's planning effect. None: the model's own prior scale
    mde: float | None = None
    mde_relative: float | None = None
    #: level of the always-valid decisions (false decisions <= alpha, however often looked at)
    decision_alpha: float = 0.05
    #: a look per this much data (event) time of the watermark: the decision's
    #: sequence depends on the data's own time, not on how often a worker ticks
    look_seconds: int = 3600

    @property
    def primary_metric(self) -> str:
        """The metric decided first: ``primary``, else the first metric."""
        return self.primary if self.primary is not None else self.metrics[0].name

    @property
    def n_strata(self) -> int:
        """Activity strata: one fewer than ``strata_edges``."""
        return len(self.strata_edges) - 1

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The metrics' names, in config order."""
        return tuple(m.name for m in self.metrics)

    @property
    def event_metrics(self) -> tuple[str, ...]:
        """STUB (issue 26 contract §1): the event metric names units keep totals of."""
        out: list[str] = []
        for m in self.metrics:
            for name in ((m.numerator, m.denominator) if m.kind == "ratio" else (m.name,)):
                if name is not None and name not in out:
                    out.append(name)
        return tuple(out)

    @property
    def treatments(self) -> tuple[str, ...]:
        """The variants other than ``control``, in config order."""
        return tuple(v for v in self.variants if v != self.control)
