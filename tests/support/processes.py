"""The real services as real OS processes, their JSON log lines collected as they come.

    with ServiceProcesses(tmp_path / "logs") as procs:
        worker = procs.start("worker", ["worker"], {"DATABASE_URL": url, "AMQP_URL": amqp})
        worker.wait_for_event("worker.started", timeout_s=30)
        worker.kill()                              # SIGKILL to its whole process group
        assert worker.wait(timeout_s=5) == -9, worker.output()

A process runs ``python -m services ARGS`` (the ``oa-machine`` entry point) in a session of
its own; stdout and stderr go, line by line, to a list, to ``<log_dir>/<name>.log`` and, for
lines that are JSON objects, to a list of events. The environment is this process's without
any oa-machine setting (so a developer's ``DATABASE_URL`` cannot leak in), with JSON logs and
free ports (see :func:`service_env`), plus the given variables. :class:`ServiceProcesses`
stops every process it started when it closes, failing test or not.

``wait_for_event`` blocks; async tests use ``await wait_for_event_async(...)`` so that their
event loop (and the connections on it) keeps running meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from tests.support.servers import free_port

__all__ = ["ROOT", "ServiceProcess", "ServiceProcesses", "service_env"]

#: The checkout: services run from here so that ``python -m services`` imports this tree.
ROOT = Path(__file__).resolve().parents[2]

Event = dict[str, Any]


def service_env(variables: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any oa-machine setting, plus ``variables``.

    Unless ``variables`` say otherwise, logs are JSON, ``METRICS_PORT`` is 0 (a free port) and
    ``HTTP_PORT`` a free port, so that no two processes (of this test or of another run on the
    machine) clash on 8080 or 9100; ``ServiceProcess.env["HTTP_PORT"]`` tells which.
    """
    from shared.config import Settings

    names = {name.upper() for name in Settings.model_fields}
    env = {key: value for key, value in os.environ.items() if key.upper() not in names}
    env.update({
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        "METRICS_PORT": "0",
        "HTTP_PORT": str(free_port()),
    })
    env.update(variables)
    return env


class ServiceProcess:
    """One ``python -m services ARGS`` process; see the module docstring."""

    def __init__(
        self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None, *,
        log_dir: Path, cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self._events: list[Event] = []
        self._changed = threading.Condition()
        self._eof = False
        #: The whole environment the process got (see :func:`service_env`).
        self.env = service_env(env or {})
        self._log: IO[str] = self.log_path.open("a", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services", *self.args],
            env=self.env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.process.pid
        self._reader = threading.Thread(
            target=self._read, name=f"service-output-{name}", daemon=True
        )
        self._reader.start()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- output

    def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                event = _parse(line)
                with self._changed:
                    self.lines.append(line)
                    if event is not None:
                        self._events.append(event)
                    with contextlib.suppress(ValueError):  # closed by stop() on a timeout
                        self._log.write(line + "\n")
                        self._log.flush()
                    self._changed.notify_all()
        finally:
            stream.close()
            with self._changed:
                self._eof = True
                self._changed.notify_all()

    def events(self, event_name: str | None = None, **fields: Any) -> list[Event]:
        """The JSON log lines so far, those named ``event_name`` with ``fields`` if given."""
        with self._changed:
            return [event for event in self._events if _matches(event, event_name, fields)]

    def event_count(self) -> int:
        """How many JSON lines have arrived: a mark to pass as ``since`` to wait_for_event."""
        with self._changed:
            return len(self._events)

    def wait_for_event(
        self, event_name: str, timeout_s: float, *, since: int = 0, **fields: Any
    ) -> Event:
        """The first JSON line from index ``since`` with ``"event": event_name`` and ``fields``.

        Waits up to ``timeout_s``; raises AssertionError (with the output) on a timeout or if
        the process ends without printing it. In async tests use :meth:`wait_for_event_async`,
        which lets the event loop run meanwhile.
        """
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                event, since, ended = self._find(event_name, since, fields)
                if event is not None:
                    return event
                remaining = deadline - time.monotonic()
                if ended or remaining <= 0:
                    raise self._not_seen(event_name, fields, timeout_s)
                self._changed.wait(remaining)

    async def wait_for_event_async(
        self, event_name: str, timeout_s: float, *, since: int = 0, **fields: Any
    ) -> Event:
        """:meth:`wait_for_event` for async tests."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._changed:
                event, since, ended = self._find(event_name, since, fields)
            if event is not None:
                return event
            if ended or time.monotonic() > deadline:
                raise self._not_seen(event_name, fields, timeout_s)
            await asyncio.sleep(0.05)

    def _find(
        self, event_name: str, since: int, fields: Mapping[str, Any]
    ) -> tuple[Event | None, int, bool]:
        # Called with the lock held: (match or None, where to look next time, output ended).
        for event in self._events[since:]:
            if _matches(event, event_name, fields):
                return event, since, self._eof
        return None, len(self._events), self._eof

    def _not_seen(
        self, event_name: str, fields: Mapping[str, Any], timeout_s: float
    ) -> AssertionError:
        wanted = _describe(event_name, fields)
        if self._eof:
            return AssertionError(
                f"{self.name} ended (exit {self.process.poll()}) without {wanted}\n"
                f"{self.output()}"
            )
        return AssertionError(f"{self.name}: no {wanted} within {timeout_s} s\n{self.output()}")

    def output(self, lines: int = 200) -> str:
        """The last ``lines`` lines of output, headed by the command, for assertion messages."""
        with self._changed:
            tail = self.lines[-lines:]
            skipped = len(self.lines) - len(tail)
        head = f"--- {self.name}: python -m services {' '.join(self.args)} (pid {self.pid})"
        if skipped:
            head += f", last {len(tail)} of {skipped + len(tail)} lines, all in {self.log_path}"
        return "\n".join([head, *tail])

    # -- process control

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the service's own process (not its children)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL to the whole process group: the service and every process it started."""
        if self.process.returncode is None:
            # Not reaped yet, so the pid (and the group id) cannot have been reused.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        else:
            self._kill_leftovers()

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to end; its exit code (negative: killed by that signal).

        Raises AssertionError (with the output) if it is still running after ``timeout_s``.
        """
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout_s} s\n{self.output()}"
            ) from None
        # Let the reader take the last lines, unless a child still holds the pipe open.
        self._reader.join(timeout=2)
        return code

    def stop(self, timeout_s: float = 10) -> int:
        """SIGTERM, then SIGKILL to the group after ``timeout_s``; then the group's leftovers.

        Returns the exit code. Idempotent; safe on a process that already ended.
        """
        if self.alive:
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
                self.process.wait(10)
        # Children the service left behind (a worker's zygote, a run) go with it.
        self._kill_leftovers()
        self._reader.join(timeout=5)
        with self._changed:
            self._log.close()
        code = self.process.returncode
        assert code is not None
        return code

    def _kill_leftovers(self) -> None:
        # Members of the group that outlived the service. Looked up one by one (not killpg):
        # once the group is empty and the service reaped, its pid may in principle be reused.
        for pid in _group_members(self.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


class ServiceProcesses:
    """Starts service processes and stops all of them on close (use as a context manager)."""

    def __init__(self, log_dir: Path | None = None) -> None:
        """Logs go to ``log_dir``; without one, to a temporary directory removed on close."""
        self._own_log_dir = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="oa-test-services-"))
        self.started: list[ServiceProcess] = []

    def start(
        self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None
    ) -> ServiceProcess:
        """Start ``python -m services ARGS``; ``name`` must be unique (it names the log)."""
        if any(process.name == name for process in self.started):
            raise ValueError(f"a process named {name!r} was already started")
        process = ServiceProcess(name, args, env, log_dir=self.log_dir)
        self.started.append(process)
        return process

    def close(self) -> None:
        """Stop every process: SIGTERM to all at once, then SIGKILL what remains."""
        for process in self.started:
            process.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.process.wait(max(deadline - time.monotonic(), 0.1))
        for process in self.started:
            process.stop(timeout_s=0.1)
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def outputs(self) -> str:
        """Every process's output, for an assertion message."""
        return "\n".join(process.output() for process in self.started)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _parse(line: str) -> Event | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _matches(event: Event, event_name: str | None, fields: Mapping[str, Any]) -> bool:
    if event_name is not None and event.get("event") != event_name:
        return False
    return all(event.get(key) == value for key, value in fields.items())


def _describe(event_name: str, fields: Mapping[str, Any]) -> str:
    extra = "".join(f", {key}={value!r}" for key, value in fields.items())
    return f'"event": {event_name!r}{extra}'
