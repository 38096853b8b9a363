"""``liftstream simulate``: synthetic traffic with a known population effect.

Writes events (to a JSONL file, or produced to Kafka keyed by unit_id with a
progress bar), the experiment config, and the ground truth. The population
model is ``streams.dev.synthetic``'s, shared with the tests and the demo.

``--covariate-rho R`` gives each unit a pre-experiment value of the metric
(the exposure's ``pre``, CUPED, issue 18) whose noise correlates R with the
in-experiment noise; ``--covariate-missing Q`` leaves it out for a share Q
of the units (new users). ``--novelty X`` switches to the visits model (one
metric event per visit, issue 19) with an extra lift X on each unit's first
day since exposure; the truth then has the lift of each exposure-age bin.

Metric kinds (issue 26; ``streams.dev.synthetic``'s kind models, the same
arrivals, a relative lift that varies with activity): ``--kind conversion``
(``--base-rate P``, down to 0.01: metric ``purchase``, Y = 1 when the unit's
total is above 0), ``--kind ratio`` (``--ratio-corr R``: ``revenue`` per
``sessions``, the two totals correlated R over the control population),
``--revenue-sigma S`` (a ``revenue`` sum: lognormal with σ S, a point mass
at 0 of ``--zero-share Q`` of the units). ``--cap-upper X`` caps the
revenue's (or the ratio's numerator's) window total at X in the config; the
truth is then the capped population effect, with the uncapped one under
``uncapped``. Units whose outcome is 0 emit no metric event (a conversion
counts them as 0: the contract's "units without an event included").
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from schemas.codec import dumps
from schemas.records import ExperimentConfig, MetricSpec
from streams.dev.synthetic import Scenario, age_truth, events, population, truth
from streams.state.semantics import age_edges_ms

#: issue 26: the metric kinds ``liftstream simulate --kind`` makes
SIM_KINDS = ("sum", "conversion", "ratio")
#: the event metric names of each kind's traffic (a ratio: numerator, denominator)
CONVERSION_METRIC = "purchase"
REVENUE_METRIC = "revenue"
RATIO_METRIC, RATIO_NUMERATOR, RATIO_DENOMINATOR = "revenue_per_session", "revenue", "sessions"


@dataclasses.dataclass(frozen=True)
class KindOptions:
    """What ``--kind`` and its flags ask for (issue 26); the default is
    today's normal ``value`` sum. ``None`` = the synthetic scenario's default."""

    kind: str = "sum"
    base_rate: float | None = None  # conversion: the control's rate (0.01 .. 1)
    ratio_corr: float | None = None  # ratio: corr(M, D) over the control population
    revenue_sigma: float | None = None  # sum: lognormal revenue's σ (a point mass at 0)
    zero_share: float | None = None  # revenue: share of units with 0
    cap_upper: float | None = None  # revenue / a ratio's numerator: the config's cap
    effect: float | None = None  # the population lift (kinds) or effect (sum)

    def check(self) -> None:
        """Refuse what the kind does not have, with the flag's name."""
        if self.kind not in SIM_KINDS:
            raise ValueError(f"--kind must be one of {', '.join(SIM_KINDS)}, got {self.kind!r}")
        if self.base_rate is not None and (self.kind != "conversion"
                                           or not 0.0 < self.base_rate < 1.0):
            raise ValueError("--base-rate is a conversion's control rate, in (0, 1), "
                             f"with --kind conversion (got {self.base_rate}, {self.kind})")
        if self.ratio_corr is not None and (self.kind != "ratio"
                                            or not 0.0 < self.ratio_corr <= 1.0):
            raise ValueError("--ratio-corr is corr(numerator, denominator) in (0, 1], "
                             f"with --kind ratio (got {self.ratio_corr}, {self.kind})")
        if self.revenue_sigma is not None and (self.kind != "sum"
                                               or not 0.0 < self.revenue_sigma <= 3.0):
            raise ValueError("--revenue-sigma is lognormal revenue's sigma in (0, 3], a sum "
                             f"(got {self.revenue_sigma}, --kind {self.kind})")
        if self.zero_share is not None and (self.revenue_sigma is None
                                            or not 0.0 <= self.zero_share < 1.0):
            raise ValueError("--zero-share is revenue's share of zeros in [0, 1), with "
                             f"--revenue-sigma (got {self.zero_share})")
        if self.cap_upper is not None and (self.revenue_sigma is None and self.kind != "ratio"
                                           or not self.cap_upper > 0.0):
            raise ValueError("--cap-upper caps revenue (--revenue-sigma) or a ratio's "
                             f"numerator, and must be > 0 (got {self.cap_upper}, {self.kind})")
        if self.cap_upper is not None and self.kind == "ratio":
            # the synthetic ratio model has no capped truth: a capped ratio
            # would be simulated against the wrong truth
            raise ValueError("--cap-upper with --kind ratio: the simulator has no capped "
                             "ratio truth; cap revenue (--revenue-sigma) instead")

    @property
    def plain(self) -> bool:
        """Today's traffic: the normal ``value`` sum."""
        return self.kind == "sum" and self.revenue_sigma is None

    def scenario(self, **base) -> Scenario:
        """The synthetic scenario of these options, on top of ``base``."""
        kw = {k: v for k, v in (("base_rate", self.base_rate), ("ratio_corr", self.ratio_corr),
                                ("revenue_sigma", self.revenue_sigma),
                                ("zero_share", self.zero_share), ("cap_upper", self.cap_upper),
                                ("effect", self.effect)) if v is not None}
        return Scenario(kind=self.kind, **kw, **base)

    def metrics(self) -> tuple[MetricSpec, ...]:
        """The experiment's metric: one of this kind, named as its events are."""
        if self.kind == "conversion":
            return (MetricSpec(CONVERSION_METRIC, kind="conversion"),)
        if self.kind == "ratio":
            return (MetricSpec(RATIO_METRIC, kind="ratio", numerator=RATIO_NUMERATOR,
                               denominator=RATIO_DENOMINATOR, cap_upper=self.cap_upper),)
        if self.revenue_sigma is not None:
            return (MetricSpec(REVENUE_METRIC, cap_upper=self.cap_upper),)
        return (MetricSpec("value"),)


def kind_events(pop, opts: KindOptions, experiment: str, started_at: int, window_ms: int,
                days: float, rng: np.random.Generator) -> list[dict]:
    """The events of a kind population (``streams.dev.synthetic.events``, the one
    layout; a ratio's numerator and its denominator's sessions), without the
    metric events of value 0 (a unit without a purchase sends none)."""
    metric = opts.metrics()[0]
    if opts.kind == "ratio":
        evs = events(pop, experiment, started_at, window_ms, days, rng,
                     metric=metric.numerator, den_metric=metric.denominator)
    else:
        evs = events(pop, experiment, started_at, window_ms, days, rng, metric=metric.name)
    return [e for e in evs if e["type"] != "metric" or e["value"] != 0.0]


def make_traffic(units: int, days: float, experiment: str, seed: int, window_seconds: int,
                 started_at: int, covariate_rho: float | None = None,
                 covariate_missing: float = 0.0, novelty: float | None = None,
                 effect_slope: float | None = None, kinds: KindOptions | None = None
                 ) -> tuple[ExperimentConfig, list[dict], dict]:
    """The config, events and truth of one simulated experiment; with
    ``covariate_rho`` its exposures carry ``pre``, with ``novelty`` it is the
    visits model, with ``kinds`` a conversion, ratio or revenue metric
    (``streams.dev.synthetic``)."""
    opts = kinds or KindOptions()
    opts.check()
    if not opts.plain and (novelty is not None or covariate_rho is not None):
        raise ValueError("--kind, --revenue-sigma: without --novelty and --covariate-rho "
                         "(the kind models have neither)")
    if novelty is not None and (window_seconds % 86_400 or window_seconds < 2 * 86_400):
        raise ValueError("--novelty needs a window of whole days, at least 2 "
                         f"(--window-seconds), got {window_seconds}")
    if covariate_rho is not None and not -1.0 <= covariate_rho <= 1.0:
        raise ValueError(f"covariate_rho must be in [-1, 1], got {covariate_rho}")
    if not 0.0 <= covariate_missing <= 1.0:
        raise ValueError(f"covariate_missing must be in [0, 1], got {covariate_missing}")
    rng = np.random.default_rng(seed)
    extra = {} if effect_slope is None else {"effect_slope": effect_slope}
    if not opts.plain:
        return _kind_traffic(units, days, experiment, window_seconds, started_at, opts, extra, rng)
    if opts.effect is not None:
        extra["effect"] = opts.effect
    if novelty is not None:
        extra.update(novelty=novelty, window_days=window_seconds // 86_400)
    pop = population(Scenario(n_units=units, covariate_rho=covariate_rho,
                              covariate_missing=covariate_missing, **extra), rng)
    cfg = ExperimentConfig(experiment_id=experiment, window_seconds=window_seconds,
                           started_at=started_at)
    evs = events(pop, experiment, started_at, window_seconds * 1000, days, rng)
    tr = truth(pop)
    if novelty is not None:
        tr["novelty"] = novelty
        tr["by_exposure_age"] = age_truth(pop, tuple(e // 86_400_000 for e in age_edges_ms(cfg)))
    return cfg, evs, tr


def _kind_traffic(units: int, days: float, experiment: str, window_seconds: int,
                  started_at: int, opts: KindOptions, extra: dict, rng: np.random.Generator
                  ) -> tuple[ExperimentConfig, list[dict], dict]:
    """``make_traffic`` for a conversion, ratio or revenue metric: its config
    names the kind, the truth is the kind's population estimand
    (``kind_truth``: capped with ``uncapped`` beside, a ratio's ``ratios``)."""
    from streams.dev.synthetic import kind_truth  # issue 26's kind models

    wd = max(1, window_seconds // 86_400)
    pop = population(opts.scenario(n_units=units, window_days=wd, **extra), rng)
    cfg = ExperimentConfig(experiment_id=experiment, window_seconds=window_seconds,
                           started_at=started_at, metrics=opts.metrics())
    evs = kind_events(pop, opts, experiment, started_at, window_seconds * 1000, days, rng)
    tr = {**truth(pop), **kind_truth(pop), "metric": cfg.metrics[0].name}
    return cfg, evs, tr


def produce(evs: list[dict], bootstrap, topic: str, rate: float = 0.0) -> None:
    """``bootstrap``: a bootstrap string or a client config (``kafka_config``)."""
    from confluent_kafka import Producer
    from tqdm import tqdm

    from streams.config.settings import kafka_config

    conf = kafka_config(bootstrap, **{"linger.ms": 20, "enable.idempotence": False,
                                      "compression.type": "none"})
    bootstrap = conf["bootstrap.servers"]
    prod = Producer(conf)
    t0 = time.monotonic()
    for i, e in enumerate(tqdm(evs, unit="ev", disable=not sys.stderr.isatty())):
        while True:
            try:
                prod.produce(topic, key=e["unit_id"].encode(), value=dumps(e))
                break
            except BufferError:
                prod.poll(0.1)
        prod.poll(0)
        if rate > 0:
            ahead = (i + 1) / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    left = prod.flush(60)
    if left:
        raise RuntimeError(f"{left} events not delivered to {bootstrap}")
