"""A pre-imported process from which every run's child is forked.

Starting a fresh interpreter for each run cost ~1.2 s before the run did anything (pyarrow,
numpy, pydantic, pyproj, shapely, jsonschema: see docs/benchmarks.md), paid again by every one
of the ~4,900 runs of a weekly batch. The zygote imports them once and forks a child per run,
which starts in a few milliseconds with the modules already loaded.

The zygote is its own process, started by :class:`Zygote` in the worker (or the
``process-one`` command) and not the worker itself, because the worker runs an event loop, a
broker connection and threads: forking that is unsafe. The zygote has one thread and does
nothing but fork and reap.

Protocol, one JSON object per line, over the zygote's stdin and stdout::

    parent → zygote   {"id": 7, "request": PATH, "output": PATH, "terminal": false,
                       "memory_bytes": N}
    zygote → parent   {"ready": true}                                  once, after importing
                      {"id": 7, "pid": 4242}  or  {"id": 7, "error": "..."}
                      {"pid": 4242, "returncode": -9}                  when that child ends

Each child leads a new session (so a whole process group can be killed), has the memory limit
as ``RLIMIT_AS``, reads nothing, writes stdout (and stderr unless ``terminal``) to ``output``
and runs :func:`services.worker.child.main` on the request. When the parent goes away (its end
of the pipe closes), the zygote kills its children's groups and exits, so no run outlives its
worker.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import IO, Any


class ZygoteLost(Exception):
    """The zygote died or could not fork: the runs it had in flight become failed runs, and
    the next run starts a new zygote."""


#: Modules every run needs, imported once by the zygote (what ``services.worker.child`` imports
#: at its top). pyogrio (GDAL) stays out on purpose: it is loaded by the runs that need it, and
#: preloaded it would add most of ~55 MiB to the resident size of every CSV run.
PRELOAD = ("services.worker.child",)
#: What the worker service's zygote imports besides (``python -m services.worker.zygote
#: --service``): almost every run there downloads over HTTP (aiohttp, deferred in the modules
#: so that a ``process-one`` of a local file does not pay for it) and every successful one draws
#: a PNG preview. In a forked child each of these imports cost again on every run, about
#: 0.3 s of a trivial run's 0.5 s (docs/benchmarks.md); imported once here, they cost nothing.
SERVICE_PRELOAD = ("aiohttp", "yarl", "PIL.Image", "PIL.PngImagePlugin")


# --- the zygote process ------------------------------------------------------------------------


def serve(control_in: int = 0, control_out: int = 1) -> None:
    """The zygote's loop: fork a child per request, report each child's end."""
    selector = selectors.DefaultSelector()
    selector.register(control_in, selectors.EVENT_READ, None)
    children: dict[int, int] = {}  # pid -> pidfd
    pending = b""

    def send(message: dict[str, Any]) -> None:
        os.write(control_out, json.dumps(message).encode() + b"\n")

    send({"ready": True})
    while True:
        for key, _events in selector.select():
            if key.data is not None:  # a child ended
                pid: int = key.data
                _, status = os.waitpid(pid, 0)
                selector.unregister(key.fd)
                os.close(key.fd)
                children.pop(pid, None)
                send({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)})
                continue
            chunk = os.read(control_in, 1 << 16)
            if not chunk:  # the parent is gone: so are its runs
                for pid in children:
                    _kill_group(pid)
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    _answer(json.loads(line), selector, children, send, control_in, control_out)


def _answer(
    order: dict[str, Any],
    selector: selectors.BaseSelector,
    children: dict[int, int],
    send: Any,
    control_in: int,
    control_out: int,
) -> None:
    try:
        pid = os.fork()
    except OSError as exc:
        send({"id": order["id"], "error": f"fork failed: {exc}"})
        return
    if pid == 0:
        # The child: nothing of the zygote's event plumbing may leak into the run.
        selector.close()
        for pidfd in children.values():
            os.close(pidfd)
        _run_child(order, control_in, control_out)  # never returns
    pidfd = os.pidfd_open(pid)
    children[pid] = pidfd
    selector.register(pidfd, selectors.EVENT_READ, pid)
    send({"id": order["id"], "pid": pid})


def _run_child(order: dict[str, Any], control_in: int, control_out: int) -> None:
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        output = os.open(order["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(output, 1)
        if not order.get("terminal"):
            os.dup2(output, 2)
        for fd in {null, output, control_in, control_out} - {0, 1, 2}:
            os.close(fd)
        memory = int(order["memory_bytes"])
        _check_room(memory)
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        from services.worker.child import main

        code = main(["child", order["request"]])
    except BaseException:  # a child must end here, whatever happened, and say why
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


#: Address space a run needs beyond what the zygote has mapped: thread stacks, the first
#: batches. Under a limit that leaves less, a run fails in odd places (a thread whose start
#: fails for want of a stack leaves Thread.start() waiting forever), so it is refused at once.
START_ROOM_BYTES = 256 * 1024**2


def _check_room(memory_bytes: int) -> None:
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    if mapped + START_ROOM_BYTES > memory_bytes:
        # The parent reads "MemoryError" in the log as out_of_memory.
        raise MemoryError(
            f"the memory limit of {memory_bytes // 2**20} MiB leaves no room for a run: the "
            f"process maps {mapped // 2**20} MiB before it starts and needs "
            f"{START_ROOM_BYTES // 2**20} MiB more"
        )


def _kill_group(pid: int) -> None:
    """SIGKILL a run's process group; the child itself if it has not made its group yet."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    except PermissionError:
        pass


def main(argv: list[str] | None = None) -> None:
    # Ctrl-C on `process-one` reaches the whole foreground group: the command itself stops
    # the run, then closes the pipe, which ends the zygote.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    service = "--service" in (sys.argv[1:] if argv is None else argv)
    for name in (*PRELOAD, *(SERVICE_PRELOAD if service else ())):
        __import__(name)
    if service:
        # The source schema's validator takes ~30 ms to build; built here, every run has it.
        from shared.sources import prepare_validator

        prepare_validator()
    try:
        serve()
    except BrokenPipeError:
        pass  # the parent is gone before reading us; nothing is left to answer
    # Nothing is buffered (answers go out with os.write), so skip tearing down the ~100 MiB
    # of imported modules: the parent waits for this exit.
    os._exit(0)


# --- the parent's side -------------------------------------------------------------------------


@dataclass
class RunProcess:
    """A run's child process, forked by the zygote."""

    pid: int
    _ended: concurrent.futures.Future[int]

    async def wait(self) -> int:
        """The child's return code (negative: killed by that signal). Raises ZygoteLost."""
        import asyncio

        # Shielded: a caller that stops waiting (a time limit) must not cancel the future
        # the zygote's answer will settle.
        return await asyncio.shield(asyncio.wrap_future(self._ended))

    def kill(self) -> None:
        """Kill the child's whole process group (it may have started processes of its own)."""
        _kill_group(self.pid)


class Zygote:
    """The parent's handle on its zygote; started on first use, restarted if it died.

    Thread-safe and free of any event loop: the answers are read on a thread of their own and
    handed over through futures, so ``process-one`` can start it before its event loop exists
    and the worker service can use it from its one loop.
    """

    def __init__(self, command: list[str] | None = None) -> None:
        #: How the zygote is started; only tests start anything else.
        self.command = command or [sys.executable, "-m", "services.worker.zygote"]
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._next_id = 0
        self._forks: dict[int, concurrent.futures.Future[RunProcess]] = {}
        self._ends: dict[int, concurrent.futures.Future[int]] = {}
        self._ready = threading.Event()

    def for_service(self) -> None:
        """Preload what the worker service's runs need (:data:`SERVICE_PRELOAD`); call before
        :meth:`start`."""
        if "--service" not in self.command:
            self.command = [*self.command, "--service"]

    def start(self) -> None:
        """Start the zygote unless it runs; returns at once (it imports in the background)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self._ready = threading.Event()
        process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, close_fds=True,
        )
        self._process = process
        threading.Thread(
            target=self._read, args=(process,), name="zygote-reader", daemon=True
        ).start()

    async def fork(
        self, request_path: str, output_path: str, *, memory_bytes: int, terminal: bool
    ) -> RunProcess:
        """Fork a child that runs ``request_path``; raises ZygoteLost if the zygote died."""
        import asyncio

        with self._lock:
            self._start_locked()
            process = self._process
            assert process is not None and process.stdin is not None
            self._next_id += 1
            order_id = self._next_id
            answer: concurrent.futures.Future[RunProcess] = concurrent.futures.Future()
            self._forks[order_id] = answer
            order = {"id": order_id, "request": request_path, "output": output_path,
                     "terminal": terminal, "memory_bytes": memory_bytes}
            try:
                process.stdin.write(json.dumps(order).encode() + b"\n")
                process.stdin.flush()
            except OSError as exc:
                self._forks.pop(order_id, None)
                raise ZygoteLost(f"the run process could not be started: {exc}") from exc
        try:
            return await asyncio.shield(asyncio.wrap_future(answer))
        except asyncio.CancelledError:
            # The fork may still happen: its child must not run unwatched.
            answer.add_done_callback(_kill_if_forked)
            raise

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Whether the zygote has finished importing (for tests and start-up logs)."""
        return self._ready.wait(timeout_s)

    def close(self) -> None:
        """Stop the zygote; it kills the children it still has."""
        with self._lock:
            process, self._process = self._process, None
        if process is None:
            return
        if not self._ready.is_set():
            # Still importing, so it has no children yet: no need to wait for it.
            process.kill()
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _settle(self, message: dict[str, Any]) -> None:
        with self._lock:
            if message.get("ready"):
                self._ready.set()
            elif "returncode" in message:
                ended = self._ends.pop(int(message["pid"]), None)
                if ended is not None:
                    ended.set_result(int(message["returncode"]))
            elif "error" in message:
                answer = self._forks.pop(int(message["id"]), None)
                if answer is not None:
                    answer.set_exception(ZygoteLost(str(message["error"])))
            else:
                pid = int(message["pid"])
                ended = concurrent.futures.Future()
                self._ends[pid] = ended
                forked = self._forks.pop(int(message["id"]), None)
                if forked is None:  # nobody waits for this child: it must not run
                    _kill_group(pid)
                else:
                    forked.set_result(RunProcess(pid, ended))
        # Futures are only ever settled here and never cancelled (callers await them
        # shielded), so setting a result cannot fail.

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        stream: IO[bytes] | None = process.stdout
        assert stream is not None
        for line in stream:
            try:
                self._settle(json.loads(line))
            except (ValueError, KeyError, TypeError):
                # An answer we cannot read means the zygote is not what we think: stop it,
                # and everything it had in flight is settled as lost below.
                process.kill()
                break
        process.wait()
        with self._lock:
            if self._process is process:
                self._process = None
            forks, self._forks = self._forks, {}
            ends, self._ends = self._ends, {}
        reason = ZygoteLost(f"the run process's parent (zygote) exited with {process.returncode}")
        lost: list[concurrent.futures.Future[Any]] = [*forks.values(), *ends.values()]
        for future in lost:
            if not future.done():
                future.set_exception(reason)


#: The one zygote of this process: every run of a worker (or of `process-one`) is forked from it.
ZYGOTE = Zygote()


def _kill_if_forked(answer: concurrent.futures.Future[RunProcess]) -> None:
    if not answer.cancelled() and answer.exception() is None:
        answer.result().kill()


if __name__ == "__main__":
    main()
