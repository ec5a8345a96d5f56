"""`oa-machine up`: every service as a child process, logs prefixed per service, Ctrl-C stops all.

With no ``GITHUB_TOKEN`` it runs the demo: GitHub and a data provider are played on 127.0.0.1,
the services are pointed at them, and the demo sources are pushed through a signed webhook
delivery once the webhook is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

import aiohttp

from shared.config import Settings
from shared.db import migrate

SERVICES = ("webhook", "worker", "dequeuer", "scheduler")
_COLOURS = {"webhook": "36", "worker": "32", "dequeuer": "35", "scheduler": "33"}
#: Time children get to finish cleanly after SIGTERM before they are killed.
STOP_GRACE_S = 15.0
_RELAYS: set[asyncio.Future[None]] = set()


async def up(settings: Settings) -> None:
    """Migrate, start everything, and wait for Ctrl-C (or for a service to die)."""
    applied = await migrate(settings.database_url)
    _say("up", f"database ready ({len(applied)} migrations applied now)")
    env = dict(os.environ)
    demo = None
    if settings.demo_mode:
        from services.demo.demo import start_stand_ins

        demo = await start_stand_ins()
        env.update({
            "GITHUB_API_URL": demo.github.url, "WEBHOOK_SECRETS": demo.secret,
            "ALLOW_PRIVATE_URLS": "true",
        })
        env.pop("GITHUB_TOKEN", None)
        _say("up", f"demo mode: GitHub stand-in at {demo.github.url}, data at {demo.data_url}")
    children = {name: await _spawn(name, env) for name in SERVICES}
    try:
        if demo is not None:
            await _run_demo(settings, demo)
        await asyncio.wait(
            [asyncio.ensure_future(child.wait()) for child in children.values()],
            return_when=asyncio.FIRST_COMPLETED,
        )
        for name, child in children.items():
            if child.returncode is not None:
                _say("up", f"{name} exited with status {child.returncode}; stopping the rest")
    finally:
        await _stop(children)
        if demo is not None:
            await demo.stop()


async def _spawn(name: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", f"services.{name}", env={**env, "LOG_FORMAT": "console"},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )
    relay = asyncio.ensure_future(_relay(name, process))
    _RELAYS.add(relay)  # keep a reference until the child's output ends
    relay.add_done_callback(_RELAYS.discard)
    return process


async def _relay(name: str, process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    async for line in process.stdout:
        _say(name, line.decode("utf-8", "replace").rstrip())


def _say(name: str, text: str) -> None:
    colour = _COLOURS.get(name, "1")
    prefix = f"\x1b[{colour}m{name:>9}\x1b[0m |" if sys.stdout.isatty() else f"{name:>9} |"
    print(f"{prefix} {text}", flush=True)


async def _stop(children: dict[str, asyncio.subprocess.Process]) -> None:
    for child in children.values():
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for name, child in children.items():
        try:
            await asyncio.wait_for(child.wait(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            _say("up", f"{name} did not stop in {STOP_GRACE_S:g} s; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await child.wait()


async def _run_demo(settings: Settings, demo: object) -> None:
    from services.demo.demo import DEMO_REPO, DemoStandIns, deliver, demo_source_paths, push_payload

    assert isinstance(demo, DemoStandIns)
    base = f"http://{settings.http_host}:{settings.http_port}"
    await _wait_healthy(base)
    body = push_payload(DEMO_REPO, demo.sha, demo_source_paths())
    answer = await deliver(base, "push", body, demo.secret)
    _say("up", f"demo push delivered: {answer.get('runs')} runs")
    _say("up", f"open {answer.get('url')} to watch them (Ctrl-C stops everything)")


async def _wait_healthy(base: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"{base}/health") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"the webhook did not become healthy at {base} in {timeout_s:g} s")
