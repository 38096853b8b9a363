"""``liftstream worker``: run a Faust worker of one role.

Creates the topics if missing (Faust's own declaration is off: partition
counts must be what the settings say, and some brokers auto-create topics
with other counts), then hands control to Faust's worker.
"""

from __future__ import annotations

import logging
import sys

from streams.config.settings import Settings, kafka_config, redis_client
from streams.service.topics import TopicSpec, ensure_topics


def topic_specs(s: Settings) -> list[TopicSpec]:
    return [TopicSpec(name, spec["partitions"], spec["replication"], spec.get("config", {}))
            for name, spec in s.topics().items()]


def run_worker(settings: Settings, role: str, web: bool = True) -> None:
    from streams.service.app import create_app

    logging.basicConfig(level=settings.log_level.upper(),
                        format='{"t":"%(asctime)s","level":"%(levelname)s",'
                               '"logger":"%(name)s","msg":"%(message)s"}')
    log = logging.getLogger("liftstream")
    log.info("worker role=%s settings %r", role, settings)  # repr redacts secrets
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


def main(args) -> int:
    from streams.config.settings import from_args

    s = from_args(args)
    run_worker(s, args.role, web=not args.without_web)
    return 0
