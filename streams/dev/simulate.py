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
"""

from __future__ import annotations

import sys
import time

import numpy as np

from schemas.codec import dumps
from schemas.records import ExperimentConfig
from streams.dev.synthetic import Scenario, age_truth, events, population, truth
from streams.state.semantics import age_edges_ms


def make_traffic(units: int, days: float, experiment: str, seed: int, window_seconds: int,
                 started_at: int, covariate_rho: float | None = None,
                 covariate_missing: float = 0.0, novelty: float | None = None,
                 effect_slope: float | None = None
                 ) -> tuple[ExperimentConfig, list[dict], dict]:
    """The config, events and truth of one simulated experiment; with
    ``covariate_rho`` its exposures carry ``pre``, with ``novelty`` it is the
    visits model (``streams.dev.synthetic``)."""
    if novelty is not None and (window_seconds % 86_400 or window_seconds < 2 * 86_400):
        raise ValueError("--novelty needs a window of whole days, at least 2 "
                         f"(--window-seconds), got {window_seconds}")
    if covariate_rho is not None and not -1.0 <= covariate_rho <= 1.0:
        raise ValueError(f"covariate_rho must be in [-1, 1], got {covariate_rho}")
    if not 0.0 <= covariate_missing <= 1.0:
        raise ValueError(f"covariate_missing must be in [0, 1], got {covariate_missing}")
    rng = np.random.default_rng(seed)
    extra = {} if effect_slope is None else {"effect_slope": effect_slope}
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
