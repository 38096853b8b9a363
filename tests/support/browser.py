"""Headless Chromium for the dashboard tests: one-shot renders (``--dump-dom``,
``--screenshot``) and a page driven through the DevTools protocol (fill a form,
read the page's state), over the protocol's websocket with aiohttp.

Tests skip when ``chromium()`` is None (Debian: ``apt-get install chromium``;
``.ci/run`` installs it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from typing import Any

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars"]


def chromium() -> str | None:
    """The Chromium (or Chrome) executable, None when none is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def run_chromium(url: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """One headless Chromium run on ``url`` with a fresh profile."""
    with tempfile.TemporaryDirectory(prefix="liftstream-chromium-") as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                               *args, url], capture_output=True, timeout=timeout)


class Page:
    """One tab of a headless Chromium, driven over the DevTools protocol:
    ``evaluate`` runs JavaScript in it, ``wait_for`` polls an expression."""

    def __init__(self, ws, session_id: str) -> None:
        self._ws, self._session, self._next = ws, session_id, 100

    async def _call(self, method: str, params: dict, session: bool = True) -> dict:
        self._next += 1
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = self._session
        await self._ws.send_str(json.dumps(msg))
        while True:  # skip the protocol's events until our answer
            got = json.loads((await self._ws.receive()).data)
            if got.get("id") == self._next:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                return got["result"]

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (awaited when it is a promise)."""
        res = await self._call("Runtime.evaluate", {"expression": expression,
                                                    "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy (an exception, e.g. while the
        page loads, counts as false); its value, or AssertionError."""
        deadline = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()"
        while True:
            got = await self.evaluate(guarded)
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression!r}")
            await asyncio.sleep(0.2)


async def open_page(url: str, drive, timeout: float = 120.0) -> Any:
    """Open ``url`` in a fresh headless Chromium and return ``await drive(page)``."""
    import aiohttp

    with tempfile.TemporaryDirectory(prefix="liftstream-chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
            "--remote-debugging-port=0", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            ws_url = None
            while ws_url is None:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/..."
                line = (await asyncio.wait_for(proc.stderr.readline(), 60)).decode()
                if not line:
                    raise RuntimeError("chromium exited before its DevTools endpoint was up")
                if "DevTools listening on " in line:
                    ws_url = line.split("DevTools listening on ", 1)[1].strip()
            async with aiohttp.ClientSession() as http, \
                    http.ws_connect(ws_url, max_msg_size=0) as ws:
                browser = Page(ws, "")
                target = await browser._call("Target.createTarget", {"url": url}, session=False)
                att = await browser._call("Target.attachToTarget",
                                          {"targetId": target["targetId"], "flatten": True},
                                          session=False)
                return await asyncio.wait_for(drive(Page(ws, att["sessionId"])), timeout)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
