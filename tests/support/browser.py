"""A real headless browser (Debian's Chromium) for page tests.

`.ci/run` installs Chromium; the flags keep it from reaching for the network, which this
machine does not have, and give it a fresh profile every time.

Two ways to use it: :func:`dump_dom` and :func:`screenshot` run Chromium once per call;
:func:`browser` starts one and drives it over the DevTools protocol (a websocket, aiohttp),
for tests that must see what a person's browser sees: the console's errors (scripts, CSP
violations, resources that failed to load), a page's links, screenshots at a phone's size.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--virtual-time-budget=3000",
)


async def _chromium(*args: str) -> bytes:
    if CHROMIUM is None:
        raise RuntimeError("Chromium is not installed: run .ci/run or apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="oa-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode != 0:
        raise RuntimeError(f"chromium failed ({process.returncode}): {stderr.decode()[-2000:]}")
    return stdout


async def dump_dom(url: str) -> str:
    """The page's DOM after its scripts ran, as Chromium serialises it."""
    return (await _chromium("--dump-dom", url)).decode()


async def screenshot(url: str, path: Path, *, width: int = 1200, height: int = 800) -> Path:
    """A PNG of the page as a person would see it."""
    await _chromium(f"--screenshot={path}", f"--window-size={width},{height}", url)
    return path


# --- Driving Chromium over the DevTools protocol ---------------------------------------------

_DEVTOOLS = re.compile(r"DevTools listening on (ws://\S+)")
#: The longest a page may take to load in a test.
LOAD_TIMEOUT_S = 20.0


@dataclass
class Visit:
    """What loading one URL showed: the document's HTTP status, every console error, the
    page's links (absolute), its title and text."""

    url: str
    status: int | None
    errors: list[str]
    links: list[str]
    title: str
    text: str


@dataclass
class Browser:
    """A headless Chromium and one tab, driven over the DevTools protocol."""

    _process: asyncio.subprocess.Process
    _socket: aiohttp.ClientWebSocketResponse
    _session: str = ""
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _waiting: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _events: list[dict[str, Any]] = field(default_factory=list)
    _loaded: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   page: bool = True) -> dict[str, Any]:
        number = next(self._ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if page and self._session:
            message["sessionId"] = self._session
        await self._socket.send_str(json.dumps(message))
        result = await asyncio.wait_for(answer, LOAD_TIMEOUT_S)
        if "error" in result:
            raise RuntimeError(f"{method}: {result['error']}")
        return dict(result.get("result", {}))

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                waiting = self._waiting.pop(data["id"], None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(data)
            else:
                self._events.append(data)
                if data.get("method") == "Page.loadEventFired":
                    self._loaded.set()

    async def visit(self, url: str, *, width: int = 1200, height: int = 900,
                    mobile: bool = False) -> Visit:
        """Load ``url`` and wait for its load event and a moment after it (late errors, the
        favicon)."""
        await self.call("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
        self._events.clear()
        self._loaded.clear()
        await self.call("Page.navigate", {"url": url})
        await asyncio.wait_for(self._loaded.wait(), LOAD_TIMEOUT_S)
        await asyncio.sleep(0.3)
        found = await self.call("Runtime.evaluate", {"returnByValue": True, "expression": (
            "({links: Array.from(document.querySelectorAll('a[href]'),"
            "              a => new URL(a.getAttribute('href'), document.baseURI).href),"
            " title: document.title, text: document.body ? document.body.innerText : ''})")})
        value = found["result"]["value"]
        return Visit(url, self._document_status(url), self._errors(), value["links"],
                     value["title"], value["text"])

    def _document_status(self, url: str) -> int | None:
        for event in self._events:
            params = event.get("params", {})
            if event.get("method") == "Network.responseReceived" \
                    and params.get("type") == "Document":
                return int(params["response"]["status"])
        return None

    def _errors(self) -> list[str]:
        errors = []
        for event in self._events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error",
                                                                                 "assert"):
                errors.append("console: " + " ".join(
                    str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))
            elif method == "Runtime.exceptionThrown":
                errors.append("exception: " + params["exceptionDetails"].get("text", ""))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                errors.append(f"{entry['source']}: {entry['text']} {entry.get('url', '')}")
        return errors

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page as it is now."""
        shot = await self.call("Page.captureScreenshot", {"format": "png",
                                                          "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    """A fresh headless Chromium (its own profile), stopped afterwards."""
    if CHROMIUM is None:
        raise RuntimeError("Chromium is not installed: run .ci/run or apt-get install chromium")
    with tempfile.TemporaryDirectory(prefix="oa-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            CHROMIUM, *[flag for flag in _FLAGS if not flag.startswith("--virtual-time")],
            f"--user-data-dir={profile}", "--remote-debugging-port=0",
            "--remote-allow-origins=*", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            url = await asyncio.wait_for(_devtools_url(process), 30)
            async with aiohttp.ClientSession() as session, session.ws_connect(
                url, max_msg_size=0
            ) as socket:
                driven = Browser(process, socket)
                reader = asyncio.create_task(driven._read())
                try:
                    target = await driven.call("Target.createTarget", {"url": "about:blank"})
                    attached = await driven.call("Target.attachToTarget", {
                        "targetId": target["targetId"], "flatten": True})
                    driven._session = attached["sessionId"]
                    for domain in ("Page", "Runtime", "Log", "Network"):
                        await driven.call(f"{domain}.enable")
                    yield driven
                finally:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


async def _devtools_url(process: asyncio.subprocess.Process) -> str:
    assert process.stderr is not None
    while line := await process.stderr.readline():
        found = _DEVTOOLS.search(line.decode(errors="replace"))
        if found:
            # Keep draining stderr so that Chromium never blocks on a full pipe.
            asyncio.get_running_loop().create_task(_drain(process.stderr))
            return found.group(1)
    raise RuntimeError("chromium exited before it opened its DevTools port")


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
