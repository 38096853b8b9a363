"""``liftstream demo`` leaves nothing running when it ends (issue 15 item 6).

The demo starts a broker, a redis-server and a worker as child processes.
Killed with -9 (no chance to clean up) its children die with it
(``PR_SET_PDEATHSIG``, ``streams.dev.embedded.dies_with_parent``); Ctrl-C sent
to the demo process alone stops it, and them, as SIGTERM does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.support.streaming_harness import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240),
              pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="PR_SET_PDEATHSIG is Linux's")]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_demo_children_end_with_it(sig, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFTSTREAM_")
           or k == "LIFTSTREAM_TANSU"}
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "demo", "--no-traffic",
                             "--duration", "180"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    kids: list[psutil.Process] = []
    try:
        info = json.loads(proc.stdout.readline())  # printed once everything is up
        assert {"bootstrap_servers", "redis_url", "http"} <= set(info)
        kids = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(k.cmdline()) for k in kids)
        assert "redis-server" in names and "worker" in names, names
        os.kill(proc.pid, sig)  # the demo process alone, not its group
        rc = proc.wait(40)
        if sig == signal.SIGINT:
            assert rc == 0
        _, alive = psutil.wait_procs(kids, timeout=20)
        assert not alive, [" ".join(p.cmdline()) for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for k in kids:
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass
