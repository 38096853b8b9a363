"""Worker configuration: flags over ``LIFTSTREAM_*`` environment variables over
safe defaults (12-factor). One dataclass, so every component reads the same
names; ``add_arguments`` exposes each field as ``--kebab-case`` flag.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields


def _bool(s: str) -> bool:
    return s.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Settings:
    bootstrap_servers: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    app_id: str = "liftstream"
    topic_events: str = "liftstream.events"
    topic_experiments: str = "liftstream.experiments"
    topic_dirty: str = "liftstream.dirty"
    topic_estimates: str = "liftstream.estimates"
    topic_alerts: str = "liftstream.alerts"
    topic_deadletter: str = "liftstream.dead-letter"
    partitions: int = 6
    replication: int = 1
    chains: int = 8
    sweeps_per_tick: int = 50
    tick_seconds: float = 1.0
    window_draws: int = 200
    warmup: int = 100
    device: str = "auto"
    auto_register: bool = False
    batch_size: int = 500
    batch_seconds: float = 0.2
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    log_level: str = "warning"
    seed: int = 0
    extra: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        env = os.environ if env is None else env
        kw = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = env.get(f"LIFTSTREAM_{f.name.upper()}")
            if raw is not None:
                kw[f.name] = _convert(f.type, raw)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def topics(self) -> dict[str, dict]:
        """Every topic with its partitions and config (DESIGN §3)."""
        p, r = self.partitions, self.replication
        compact = {"cleanup.policy": "compact"}
        return {
            self.topic_events: {"partitions": p, "replication": r},
            self.topic_experiments: {"partitions": 1, "replication": r, "config": compact},
            self.topic_dirty: {"partitions": p, "replication": r},
            self.topic_estimates: {"partitions": p, "replication": r, "config": compact},
            self.topic_alerts: {"partitions": 1, "replication": r},
            self.topic_deadletter: {"partitions": 1, "replication": r},
        }


def _convert(tp, raw: str):
    t = tp if isinstance(tp, str) else tp.__name__
    if t == "int":
        return int(raw)
    if t == "float":
        return float(raw)
    if t == "bool":
        return _bool(raw)
    return raw


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting; unset flags fall back to env, then defaults."""
    for f in fields(Settings):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        t = f.type if isinstance(f.type, str) else f.type.__name__
        if t == "bool":
            p.add_argument(flag, default=None, action=argparse.BooleanOptionalAction,
                           help=f"env LIFTSTREAM_{f.name.upper()} (default {f.default})")
        else:
            conv = {"int": int, "float": float}.get(t, str)
            p.add_argument(flag, default=None, type=conv,
                           help=f"env LIFTSTREAM_{f.name.upper()} (default {f.default})")


def from_args(args: argparse.Namespace, **more) -> Settings:
    names = {f.name for f in fields(Settings)}
    over = {k: v for k, v in vars(args).items() if k in names}
    over.update(more)
    return Settings.from_env(**over)
