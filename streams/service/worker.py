"""Run a Faust worker of one role (``liftstream worker``, ``streams.cli.worker``).

Creates the topics if missing (Faust's own declaration is off: partition
counts must be what the settings say, and some brokers auto-create topics
with other counts), then hands control to Faust's worker.
"""

from __future__ import annotations

import gc
import logging
import sys

from streams import native
from streams.config.settings import Settings, kafka_config, redis_client
from streams.service.topics import TopicSpec, ensure_topics


def topic_specs(s: Settings) -> list[TopicSpec]:
    """Every topic of ``s`` (``Settings.topics``) as a ``TopicSpec`` for
    ``ensure_topics``: partitions, replication, topic config."""
    return [TopicSpec(name, spec["partitions"], spec["replication"], spec.get("config", {}))
            for name, spec in s.topics().items()]


#: the young generation of the worker's garbage collector, in net container
#: allocations (CPython's default: 700)
GC_YOUNG = 20_000


def tune_gc() -> None:
    """Collect the young generation every ``GC_YOUNG`` net allocations, not
    700. Why, measured (issue 25, docs/performance.md): while an owner's unit
    cache fills (a claim, a rebalance, a backlog) every unit adds a few
    long-lived objects, so the default collected every ~150 events and
    rescanned what it had promoted: ~3 µs of ~22 µs of client CPU per event
    of the in-process ingest, ~0.3 µs with this. Objects freed by their
    reference count are not affected; only cycles wait a little longer.

    Measured again, not adopted (60k bench events in-process): the collections in the run
    cost ~2% of the client CPU (6 young ones, ~0.03 s) and about the same with a young
    threshold of 100,000 (1 collection scanning 5x as many objects) or ``gc.freeze()``
    after startup (no full collection runs in such a stretch). Callgrind's larger
    ``gc_collect_main`` in a full run than in a skip run (~2.4k instructions an event
    over 10k events) is mostly the interpreter's collections at exit over the larger heap
    (~1.8k) plus one young collection (~0.6k), not a per-event cost."""
    young, mid, old = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG), mid, old)


def run_worker(settings: Settings, role: str, web: bool = True) -> None:
    """Run a worker until it is stopped: JSON logging at
    ``settings.log_level``, the topics created if missing, the registry
    filled from the experiments topic, then Faust's worker on
    ``create_app(settings, role)``.

    :param settings: the worker's settings.
    :param role: ``ingest``, ``sampler`` or ``all``.
    :param web: serve the HTTP API (``streams.service.web``) on
        ``settings.web_host:web_port``; refused (``SystemExit``) when that would
        expose it without a strong token (``check_exposure``).
    :returns: only when Faust's worker returns (it usually exits the process).
    """
    from streams.service.app import create_app
    from streams.service.web import UnsafeWebSettings, check_exposure

    if web:  # before any broker or Redis is contacted
        try:
            check_exposure(settings)
        except UnsafeWebSettings as e:
            raise SystemExit(f"liftstream worker: {e}") from None
    logging.basicConfig(level=settings.log_level.upper(),
                        format='{"t":"%(asctime)s","level":"%(levelname)s",'
                               '"logger":"%(name)s","msg":"%(message)s"}')
    log = logging.getLogger("liftstream")
    log.info("worker role=%s settings %r", role, settings)  # repr redacts secrets
    log.info("rules: %s", native.status())  # compiled (streams.native) or pure Python
    tune_gc()
    ensure_topics(kafka_config(settings), topic_specs(settings))
    from streams.state.registry import Registry, bootstrap_from_topic

    bootstrap_from_topic(kafka_config(settings), settings.topic_experiments,
                         Registry(redis_client(settings)))
    app = create_app(settings, role)
    faust_level = {"warning": "warn", "critical": "crit"}.get(settings.log_level.lower(),
                                                               settings.log_level.lower())
    argv = ["liftstream-worker", "worker", "-l", faust_level]
    if web:
        argv += ["--web-port", str(settings.web_port), "--web-host", settings.web_host,
                 "--web-bind", settings.web_host]
    else:
        argv += ["--without-web"]
    sys.argv = argv
    app.main()
