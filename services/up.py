"""`oa-machine up`: every service as a child process, logs prefixed per service, Ctrl-C stops all.

A child that exits on its own is started again after a backoff (:class:`Supervisor`): one
service crashing, say the dequeuer losing PostgreSQL at start, must not take the others down
with it. Ctrl-C or SIGTERM stops them all.

With no ``GITHUB_TOKEN`` it runs the demo: GitHub and a data provider are played on 127.0.0.1,
the services are pointed at them, and the demo sources are pushed through a signed webhook
delivery once the webhook is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp

from shared.config import Settings
from shared.db import migrate
from shared.logging import configure_logging

SERVICES = ("webhook", "worker", "dequeuer", "scheduler")
_COLOURS = {"webhook": "36", "worker": "32", "dequeuer": "35", "scheduler": "33"}
#: Time children get to finish cleanly after SIGTERM before they are killed.
STOP_GRACE_S = 15.0

#: Prints one line for one service (or ``up`` itself).
Say = Callable[[str, str], None]


async def up(settings: Settings) -> None:
    """Migrate, start everything, and keep it running until cancelled (Ctrl-C, SIGTERM)."""
    # One format on the screen: up's own log lines too are console lines behind its prefix,
    # as the children's are (they get LOG_FORMAT=console below).
    configure_logging("console", settings.log_level, service="up", handler=SayHandler("up"))
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
    env["LOG_FORMAT"] = "console"
    supervisor = Supervisor(
        {name: [sys.executable, "-m", f"services.{name}"] for name in SERVICES}, env=env,
        child_env=child_settings(settings),
    )
    await supervisor.start()
    try:
        if demo is not None:
            await _run_demo(settings, demo)
        if await answers(settings.rabbitmq_management_url):
            _say("up", f"RabbitMQ management UI at {settings.rabbitmq_management_url}")
        await supervisor.wait()
    finally:
        await supervisor.stop()
        if demo is not None:
            await demo.stop()


def child_settings(settings: Settings) -> dict[str, dict[str, str]]:
    """What each child gets on top of the common environment.

    Each service with a metrics server gets a port of its own (``METRICS_PORT`` + 1, + 2, ...;
    0 stays 0, a free port each), and the worker a grace period that ends before ``up`` kills
    what has not stopped, so that Ctrl-C hands a run back instead of losing it to SIGKILL.
    """
    extra: dict[str, dict[str, str]] = {}
    for index, name in enumerate(name for name in SERVICES if name != "webhook"):
        port = settings.metrics_port + index + 1 if settings.metrics_port else 0
        extra[name] = {"METRICS_PORT": str(port)}
    grace_s = min(settings.worker_grace_s, max(STOP_GRACE_S - 5, 0))
    extra["worker"]["WORKER_GRACE_S"] = f"{grace_s:g}"
    return extra


@dataclass(frozen=True)
class RestartBackoff:
    """Waits before restarting a child: ``first_s``, doubling up to ``max_s``; a child that
    stayed up ``reset_after_s`` or longer before exiting starts over at ``first_s``."""

    first_s: float = 1.0
    max_s: float = 30.0
    reset_after_s: float = 60.0


DEFAULT_BACKOFF: Final = RestartBackoff()


class Supervisor:
    """Runs one child per command, each in its own session, with its output prefixed.

    A child that exits while the supervisor is not stopping is started again after a
    :class:`RestartBackoff`; the others are left alone. :meth:`stop` sends every child SIGTERM and
    kills the process group of any still running ``stop_grace_s`` later.
    """

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        *,
        env: Mapping[str, str] | None = None,
        child_env: Mapping[str, Mapping[str, str]] | None = None,
        backoff: RestartBackoff = DEFAULT_BACKOFF,
        stop_grace_s: float = STOP_GRACE_S,
        say: Say | None = None,
    ) -> None:
        self.commands = {name: list(command) for name, command in commands.items()}
        self.env = dict(env) if env is not None else None
        #: Variables of one child only, on top of ``env``.
        self.child_env = {name: dict(extra) for name, extra in (child_env or {}).items()}
        self.backoff = backoff
        self.stop_grace_s = stop_grace_s
        self.say: Say = say if say is not None else _say
        #: The current process of each child (the last one started).
        self.children: dict[str, asyncio.subprocess.Process] = {}
        #: When each child was started, every time (``time.monotonic()``).
        self.starts: dict[str, list[float]] = {name: [] for name in self.commands}
        self._stopping = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start every child; returns once each has been started once."""
        started = []
        for name in self.commands:
            started.append(asyncio.Event())
            self._watchers.append(asyncio.create_task(self._watch(name, started[-1])))
        await asyncio.gather(*(event.wait() for event in started))

    async def wait(self) -> None:
        """Return once :meth:`stop` has stopped every child (never, until someone calls it).

        Cancelling this wait leaves the children running (``asyncio.wait``, not ``gather``):
        the caller's ``finally`` stops them gracefully with :meth:`stop`.
        """
        if not self._watchers:
            return
        done, _ = await asyncio.wait(self._watchers, return_when=asyncio.FIRST_EXCEPTION)
        for watcher in done:
            watcher.result()  # a bug in a watcher ends up here, not in silence

    async def stop(self) -> None:
        """Stop every child (SIGTERM, then SIGKILL of its group after the grace) and wait."""
        self._stopping.set()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        # Let the relays print what the children said last, but do not hang on a grandchild
        # that still holds a pipe open.
        if self._relays:
            await asyncio.wait(self._relays, timeout=1.0)
        for relay in list(self._relays):
            relay.cancel()

    async def _watch(self, name: str, started: asyncio.Event) -> None:
        delay_s = self.backoff.first_s
        process: asyncio.subprocess.Process | None = None
        try:
            while not self._stopping.is_set():
                began = time.monotonic()
                self.starts[name].append(began)
                try:
                    process = await self._spawn(name)
                except OSError as exc:  # fork failing (EAGAIN, ENOMEM) passes like a crash
                    process, what = None, f"could not start ({exc})"
                finally:
                    started.set()
                if process is not None:
                    self.children[name] = process
                    what = f"exited with status {await self._run_until_stop(process)}"
                if self._stopping.is_set():
                    break
                if time.monotonic() - began >= self.backoff.reset_after_s:
                    delay_s = self.backoff.first_s
                self.say("up", f"{name} {what}; restarting in {delay_s:g} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay_s)
                delay_s = min(delay_s * 2, self.backoff.max_s)
            if process is not None:
                await self._terminate(name, process)
        finally:
            # Cancelled (a second Ctrl-C, the loop closing): never leave a child behind.
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)

    async def _run_until_stop(self, process: asyncio.subprocess.Process) -> str:
        """Wait for ``process`` to exit or for :meth:`stop`; how it exited, if it did."""
        exited = asyncio.ensure_future(process.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            exited.cancel()
        code = process.returncode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"{code} ({signal.Signals(-code).name})"
        return str(code)

    async def _spawn(self, name: str) -> asyncio.subprocess.Process:
        command = self.commands[name]
        env = self.env
        if name in self.child_env:
            env = {**(self.env if self.env is not None else os.environ), **self.child_env[name]}
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches up only; up decides
        )
        relay = asyncio.create_task(self._relay(name, process))
        self._relays.add(relay)  # keep a reference until the child's output ends
        relay.add_done_callback(self._relays.discard)
        return process

    async def _relay(self, name: str, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            self.say(name, line.decode("utf-8", "replace").rstrip())

    async def _terminate(self, name: str, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.stop_grace_s)
        except TimeoutError:
            self.say("up", f"{name} did not stop in {self.stop_grace_s:g} s; killing it")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


class SayHandler(logging.Handler):
    """Log records as lines of ``name`` through :func:`_say`, prefix and all."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in self.format(record).splitlines():
                _say(self.service, line)
        except Exception:
            self.handleError(record)


async def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether an HTTP server answers at ``url`` (any status but a server error)."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as reply:
            return reply.status < 500
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


def _say(name: str, text: str) -> None:
    colour = _COLOURS.get(name, "1")
    prefix = f"\x1b[{colour}m{name:>9}\x1b[0m |" if sys.stdout.isatty() else f"{name:>9} |"
    print(f"{prefix} {text}", flush=True)


async def _run_demo(settings: Settings, demo: object) -> None:
    from services.demo.demo import (
        DEMO_REPO,
        DemoStandIns,
        deliver,
        demo_source_paths,
        push_payload,
        wait_for_job,
    )

    assert isinstance(demo, DemoStandIns)
    base = f"http://{settings.http_host}:{settings.http_port}"
    await _wait_healthy(base)
    body = push_payload(DEMO_REPO, demo.sha, demo_source_paths())
    answer = await deliver(base, "push", body, demo.secret)
    outcome = await wait_for_job(base, str(answer["delivery"]))
    _say("up", f"demo push delivered: job {outcome.get('job_id')}")
    _say("up", f"open {outcome.get('job_url')} to watch it (Ctrl-C stops everything)")


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
