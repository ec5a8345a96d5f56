"""Throw-away PostgreSQL and RabbitMQ servers that fault tests may stop, kill and restart.

The shared servers (PostgreSQL on 5432, RabbitMQ on 5672) serve every other test run on the
machine, so a test that takes a server down gets its own, started from the installed binaries:

    with PostgresServer() as pg, RabbitServer() as rabbit:
        pg.start(); rabbit.start()
        ... pg.url("oa"), rabbit.url ...
        pg.kill(); pg.start()              # a crash and a restart (crash recovery runs)
        rabbit.stop_app(); rabbit.start_app()

Two copies of the project may run this at once: ports are picked at run time (outside the
kernel's ephemeral range, so a client's outgoing connection cannot take a port while its server
is down for a restart), names carry a random suffix, and every file lives in one temporary
directory that :meth:`close` removes. ``close`` also stops whatever still runs; an ``atexit``
hook closes servers a crashed test left open.

Measured on the 2-core development VM (PostgreSQL 15, RabbitMQ 3.10.8 on Erlang 25), with
other test runs sharing the cores:

* PostgreSQL: first start 1.3-1.6 s (initdb ~1 s of it), start 0.15 s, fast stop 0.1 s,
  kill 0.07 s, restart 0.3 s.
* RabbitMQ: start 6.5-8 s (13 s seen under a load of 2.5); about 4 s of it is Erlang loading
  and JIT-compiling the ~950 modules RabbitMQ scans at boot, whatever the configuration
  (trimming the code path or preloading modules in parallel gained nothing measurable). Stop
  1.1 s, ``stop_app`` 0.9-1.3 s, ``start_app`` 1.6-2.4 s (each includes a ~0.8 s
  ``rabbitmqctl``), kill 0.01 s, close 1.2 s. Prefer ``stop_app``/``start_app`` where a test
  only needs the broker to drop every connection and come back.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = [
    "PostgresServer",
    "RabbitServer",
    "ServerError",
    "free_port",
    "pid_alive",
]


class ServerError(RuntimeError):
    """A throw-away server failed to start or stop; the message carries its log's tail."""


# --- processes and ports --------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running process; a zombie (dead, not yet reaped) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        # No /proc (not Linux): fall back to a signal probe, which counts zombies as alive.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state follows the command name, which is in parentheses and may itself hold ')'.
    state = stat[stat.rindex(")") + 2 :].split(" ", 1)[0]
    return state not in ("Z", "X")


def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgrp, session) of a live process, None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[2]), int(fields[3])


def _live_pids() -> Iterable[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _children(parent: int) -> list[int]:
    return [pid for pid in _live_pids() if (st := _proc_stat(pid)) and st[0] == parent]


def _session_members(session: int) -> list[int]:
    return [pid for pid in _live_pids() if (st := _proc_stat(pid)) and st[2] == session]


def _cmdline_has(pid: int, text: str) -> bool:
    """True if process ``pid`` runs with ``text`` in its command line (guards pid reuse)."""
    try:
        return text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_until(done: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if done():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Ports the shared servers use (or may use after a restart) even while they are down.
_RESERVED_PORTS = frozenset({4369, 5432, 5671, 5672, 15672, 15692, 25672, 35672})


def free_port(exclude: Iterable[int] = ()) -> int:
    """A TCP port nothing listens on, below the kernel's ephemeral range, not in ``exclude``.

    Ports from ``bind(("", 0))`` come from the ephemeral range, which the kernel also hands to
    outgoing connections: while a server is down for a restart, any client could take its
    port. Ports below the range are only ever taken by an explicit bind.
    """
    low, _ = _ephemeral_range()
    first = 20000 if low > 22000 else 1024
    avoid = _RESERVED_PORTS | set(exclude)
    for _ in range(200):
        port = random.randrange(first, low)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                # 0.0.0.0 conflicts with a listener on any address, 127.0.0.1 included.
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout_s):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return "\n".join(text.splitlines()[-lines:])


def _run(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
    timeout_s: float,
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout_s, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServerError(f"{' '.join(cmd)} took more than {timeout_s} s") from exc


# Servers a test left open are closed when the interpreter exits, so that a crashed or
# interrupted session leaves no PostgreSQL or RabbitMQ running on the machine.
_OPEN: set[_Server] = set()


@atexit.register
def _close_leftovers() -> None:
    for server in list(_OPEN):
        with contextlib.suppress(Exception):
            server.close()


class _Server:
    """What both servers share: a temporary root, context management, close-once."""

    kind = "server"

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self._closed = False
        self._started_once = False
        _OPEN.add(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ServerError(f"{self.kind} in {self.root} is closed")

    def close(self) -> None:
        raise NotImplementedError

    def _remove_root(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._closed = True
        _OPEN.discard(self)


# --- PostgreSQL -----------------------------------------------------------------------------


def find_postgres_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` (Debian layout), else ``pg_config``.

    ``OA_TEST_PG_BIN_DIR`` overrides both.
    """
    override = os.environ.get("OA_TEST_PG_BIN_DIR")
    if override:
        return Path(override)
    candidates = [
        path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if (path.parent / "pg_ctl").exists()
    ]

    def version(bin_dir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bin_dir.parent.name))

    if candidates:
        return max(candidates, key=version)
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = _run([pg_config, "--bindir"], timeout_s=10)
        if result.returncode == 0 and (Path(result.stdout.strip()) / "initdb").exists():
            return Path(result.stdout.strip())
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ServerError("no PostgreSQL binaries (initdb, pg_ctl) found; set OA_TEST_PG_BIN_DIR")


class PostgresServer(_Server):
    """A PostgreSQL cluster of its own: trust authentication, fsync off, 127.0.0.1 only.

    As root the cluster runs as the OS user ``postgres`` (PostgreSQL refuses root); as anyone
    else, as that user. The data directory, the unix socket and the log live under
    :attr:`root`. :meth:`start` initialises the cluster the first time.
    """

    kind = "PostgreSQL"

    def __init__(self, *, bin_dir: Path | None = None, os_user: str = "postgres") -> None:
        super().__init__("oa-test-pg-")
        self.bin_dir = bin_dir or find_postgres_bin_dir()
        self.port = free_port()
        self.data_dir = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_path = self.root / "postgresql.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            self._as_user = [runuser, "-u", os_user, "--"]
            os.chown(self.root, *_user_ids(os_user))
        self.socket_dir.mkdir()
        if self._as_user:
            os.chown(self.socket_dir, *_user_ids(os_user))

    # -- public API

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/DATABASE``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def migrated_database(self, name: str | None = None) -> str:
        """Create database ``name`` (default ``oa_fault_<hex>``), apply every migration
        (``shared.db.migrate``) and return its URL. The server must be running."""
        from shared.db import migrate

        url = self.url(name or f"oa_fault_{uuid.uuid4().hex[:12]}")
        await migrate(url)
        return url

    @property
    def pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid``, None when there is none."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    @property
    def is_running(self) -> bool:
        """The postmaster runs (it may still be starting or stopping)."""
        pid = self.pid
        return pid is not None and pid_alive(pid) and _cmdline_has(pid, str(self.data_dir))

    def start(self, timeout_s: float = 60) -> None:
        """Start (initialising the cluster the first time); returns once it takes connections."""
        self._check_open()
        if self.is_running:
            return
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(timeout_s)
        self._clear_stale_lock()
        attempts = 1 if self._started_once else 3
        for attempt in range(attempts):
            result = self._pg_ctl(
                "start", "-w", "-t", str(int(timeout_s)), "-l", str(self.log_path),
                "-o", f"-p {self.port}", timeout_s=timeout_s + 10,
            )
            if result.returncode == 0 and _wait_until(lambda: _port_open(self.port), 10):
                self._started_once = True
                return
            log = _tail(self.log_path)
            if attempt + 1 < attempts and "already in use" in log:
                # Another test run took the port between our check and the bind: pick again.
                self.port = free_port()
                continue
            raise ServerError(
                f"PostgreSQL did not start on port {self.port}: "
                f"{result.stdout}{result.stderr}\n--- {self.log_path}:\n{log}"
            )

    def stop(self, timeout_s: float = 60) -> None:
        """Fast shutdown (``pg_ctl stop -m fast``): sessions are ended, then a checkpoint."""
        self._check_open()
        if not self.is_running:
            return
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(int(timeout_s)),
                              timeout_s=timeout_s + 10)
        if result.returncode != 0 and self.is_running:
            raise ServerError(f"pg_ctl stop failed: {result.stdout}{result.stderr}")

    def kill(self, *, whole_server: bool = True, timeout_s: float = 30) -> None:
        """SIGKILL, as a crash: no checkpoint, the next start runs crash recovery.

        ``whole_server`` (the default) kills the postmaster and every backend at once, like
        a killed container; clients see their connections reset. With False only the
        postmaster dies and the backends notice and exit by themselves, sending clients
        "terminating connection due to unexpected postmaster exit". Either way this returns
        once every process of the cluster is gone.
        """
        self._check_open()
        pid = self.pid
        if pid is None or not self.is_running:
            return
        # Backends each call setsid(), so the postmaster's process group does not hold them:
        # they are found as its children, before it dies and they are re-parented.
        children = _children(pid)
        _kill_quietly(pid)
        if whole_server:
            for child in children:
                _kill_quietly(child)
        if not _wait_until(lambda: not any(pid_alive(p) for p in [pid, *children]), timeout_s):
            raise ServerError(f"PostgreSQL processes still alive {timeout_s} s after SIGKILL")

    def restart(self, timeout_s: float = 60) -> None:
        self.stop(timeout_s)
        self.start(timeout_s)

    def close(self) -> None:
        """Stop the server (killing it if it will not stop) and remove every file."""
        if self._closed:
            return
        try:
            self.stop(timeout_s=30)
        except ServerError:
            self.kill()
        finally:
            with contextlib.suppress(ServerError):
                self.kill()
            self._remove_orphaned_shared_memory()
            self._remove_root()

    def log(self, lines: int = 40) -> str:
        """The last lines of the server log, for assertion messages."""
        return _tail(self.log_path, lines)

    # -- internals

    def _pg_ctl(self, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
        return _run([*self._as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir),
                     *args], cwd=self.root, timeout_s=timeout_s)

    def _initdb(self, timeout_s: float) -> None:
        result = _run(
            [*self._as_user, str(self.bin_dir / "initdb"), "-D", str(self.data_dir),
             "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
             "--no-instructions"],
            cwd=self.root, timeout_s=timeout_s,
        )
        if result.returncode != 0:
            raise ServerError(f"initdb failed: {result.stdout}{result.stderr}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            # Speed over durability: the cluster is thrown away, and a killed postmaster is a
            # process crash, not an OS crash, so the page cache still holds every write.
            # (synchronous_commit stays on: with it off, a commit the client saw could be
            # lost by a kill, which is not what a fault test of a real server expects.)
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "100",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] '",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# oa-machine fault tests\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())

    def _clear_stale_lock(self) -> None:
        # A killed postmaster is re-parented to PID 1, which may reap it late (or never, in a
        # container without an init). Until then it is a zombie that still answers
        # kill(pid, 0), and the next postmaster refuses both lock files, believing it alive
        # (as it would if the pid had been reused). kill() waited for every process of the
        # cluster to die, so a lock whose pid is not our postmaster is stale.
        # (Removing postmaster.pid loses no shared memory: the next postmaster on the same
        # port derives the same System V key, finds the old segment unused and recycles it.)
        for lock in (self.data_dir / "postmaster.pid",
                     *self.socket_dir.glob(".s.PGSQL.*.lock")):
            try:
                pid = int(lock.read_text().split("\n", 1)[0])
            except (OSError, ValueError):
                continue
            if not (pid_alive(pid) and _cmdline_has(pid, str(self.data_dir))):
                with contextlib.suppress(OSError):
                    lock.unlink()

    def _remove_orphaned_shared_memory(self) -> None:
        # A postmaster removes its small System V segment (the "interlock") on a clean stop
        # only; one killed and never restarted would leave it on the machine for good.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            shmid = int(lines[6].split()[1])
        except (OSError, IndexError, ValueError):
            return
        try:
            table = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
        except OSError:
            return
        for row in table:
            fields = row.split()
            # key shmid perms size cpid lpid nattch ...
            if int(fields[1]) == shmid and int(fields[6]) == 0:
                ipcrm = shutil.which("ipcrm")
                if ipcrm:
                    with contextlib.suppress(ServerError):
                        _run([ipcrm, "-m", str(shmid)], timeout_s=10)


def _user_ids(name: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


# --- RabbitMQ -------------------------------------------------------------------------------


def find_rabbitmq_scripts_dir() -> Path:
    """The directory of the real ``rabbitmq-server`` and ``rabbitmqctl`` scripts.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that switches to the ``rabbitmq`` user
    (and its HOME, hence its Erlang cookie) and to /var/lib/rabbitmq; the scripts it wraps, in
    ``/usr/lib/rabbitmq/bin``, take their whole setting from the environment.
    ``OA_TEST_RABBITMQ_SCRIPTS_DIR`` overrides.
    """
    override = os.environ.get("OA_TEST_RABBITMQ_SCRIPTS_DIR")
    if override:
        return Path(override)
    debian = Path("/usr/lib/rabbitmq/bin")
    if (debian / "rabbitmq-server").exists():
        return debian
    found = shutil.which("rabbitmq-server")
    if found:
        return Path(os.path.realpath(found)).parent
    raise ServerError("rabbitmq-server not found; set OA_TEST_RABBITMQ_SCRIPTS_DIR")


class RabbitServer(_Server):
    """A RabbitMQ node of its own: its node name, ports, epmd, cookie, data and logs.

    Nothing of the shared node is read: the environment points ``RABBITMQ_CONF_ENV_FILE``,
    the config files and the enabled-plugins file (empty: no management plugin, so no port
    clash on 15672) at files under :attr:`root`, and the node registers with an epmd of its
    own on a free port, which :meth:`close` stops.

    The node runs as a child of this process in a session of its own (``rabbitmq-server``
    in the foreground, not ``-detached``): a boot that fails, such as on a port another
    process took, is seen at once with its output instead of after a wait for a pid file.
    """

    kind = "RabbitMQ"

    def __init__(self) -> None:
        super().__init__("oa-test-rabbit-")
        self.scripts_dir = find_rabbitmq_scripts_dir()
        self.node = f"oa-test-{uuid.uuid4().hex[:12]}@localhost"
        self.port = free_port()
        self.dist_port = free_port([self.port])
        self.epmd_port = free_port([self.port, self.dist_port])
        self.pid_file = self.root / "rabbit.pid"
        self.log_dir = self.root / "log"
        self.console_log = self.root / "console.log"
        home = self.root / "home"
        for folder in (home, self.log_dir, self.root / "mnesia", self.root / "conf.d"):
            folder.mkdir()
        # Our own cookie, so rabbitmqctl (same HOME) authenticates with this node only.
        cookie = home / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (self.root / "enabled_plugins").write_text("[].\n")
        (self.root / "rabbitmq-env.conf").write_text("# no settings: all come from the env\n")
        # Tests fill small temporary file systems; the default 50 MB floor would raise a disk
        # alarm (blocking publishers) on a nearly full /tmp long before anything is wrong.
        (self.root / "advanced.config").write_text(
            "[{rabbit, [{disk_free_limit, 1000000}]}].\n"
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None

    # -- environment

    def env(self) -> dict[str, str]:
        """The environment of this node's server and CLI scripts."""
        env = {
            key: value for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update({
            "HOME": str(self.root / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.log_dir),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            # A main config file that does not exist: RabbitMQ then skips the cuttlefish
            # translation; the few settings we need are in advanced.config.
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_CONFIG_FILES": str(self.root / "conf.d"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_MOTD_FILE": str(self.root / "motd"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": str(self.log_dir / "erl_crash.dump"),
        })
        return env

    # -- public API

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:PORT/`` (guest may connect from loopback only)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int | None:
        """The Erlang VM's (beam) pid from the pid file, None when there is none."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    @property
    def is_running(self) -> bool:
        """The node's VM is up (the RabbitMQ application may be stopped: see stop_app)."""
        return self._process is not None and self._process.poll() is None and self._vm_alive()

    def _vm_alive(self) -> bool:
        # The VM's command line carries "-home <root>/home": a reused pid is not taken for it.
        pid = self.pid
        return pid is not None and pid_alive(pid) and _cmdline_has(pid, str(self.root))

    def start(self, timeout_s: float = 90) -> None:
        """Start the node; returns once ``rabbitmqctl await_startup`` says it is booted."""
        self._check_open()
        if self.is_running:
            return
        attempts = 1 if self._started_once else 3
        for attempt in range(attempts):
            error = self._boot(timeout_s)
            if error is None:
                self._started_once = True
                return
            self._reap(kill=True)
            clash = any(word in error for word in ("eaddrinuse", "already_used", "in use"))
            if attempt + 1 < attempts and clash:
                # Another run took a port between our check and the node's bind: pick again.
                self.port = free_port([self.epmd_port])
                self.dist_port = free_port([self.epmd_port, self.port])
                continue
            raise ServerError(error)

    def stop(self, timeout_s: float = 60) -> None:
        """Stop the whole node gracefully (SIGTERM, which RabbitMQ handles as a clean stop)."""
        self._check_open()
        if self._process is None:
            return
        pid = self.pid
        if pid is not None and self._vm_alive():
            _kill_quietly(pid, signal.SIGTERM)
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._reap(kill=True)
            raise ServerError(f"RabbitMQ did not stop within {timeout_s} s") from None
        self._reap(kill=True)

    def stop_app(self, timeout_s: float = 60) -> None:
        """``rabbitmqctl stop_app``: the broker closes every connection, the VM stays up."""
        self.ctl("stop_app", timeout_s=timeout_s)

    def start_app(self, timeout_s: float = 60) -> None:
        """``rabbitmqctl start_app``; returns when the broker accepts connections again."""
        self.ctl("start_app", timeout_s=timeout_s)

    def kill(self, timeout_s: float = 30) -> None:
        """SIGKILL of the Erlang VM, as a crash; the next start recovers the message store."""
        self._check_open()
        pid = self.pid
        if pid is not None and self._vm_alive():
            _kill_quietly(pid)
            if not _wait_until(lambda: not pid_alive(pid), timeout_s):
                raise ServerError(f"RabbitMQ VM {pid} still alive {timeout_s} s after SIGKILL")
        self._reap(kill=True)

    def restart(self, timeout_s: float = 90) -> None:
        self.stop(timeout_s)
        self.start(timeout_s)

    def ctl(self, *args: str, timeout_s: float = 60) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` against this node; its stdout, or ServerError."""
        result = _run(
            [str(self.scripts_dir / "rabbitmqctl"), "-q", "-n", self.node, *args],
            env=self.env(), cwd=self.root, timeout_s=timeout_s,
        )
        if result.returncode != 0:
            raise ServerError(
                f"rabbitmqctl {' '.join(args)} exited {result.returncode}: "
                f"{result.stdout}{result.stderr}\n--- log:\n{self.log()}"
            )
        return result.stdout

    def close(self) -> None:
        """Stop the node (killing it if it will not stop), stop its epmd, remove every file."""
        if self._closed:
            return
        try:
            if self.is_running:
                self.stop(timeout_s=30)
        except ServerError:
            pass
        finally:
            # Whatever state it is in (the server script gone, the VM not), nothing survives.
            with contextlib.suppress(ServerError):
                self.kill()
            self._reap(kill=True)
            self._stop_epmd()
            self._remove_root()

    def log(self, lines: int = 40) -> str:
        """The last lines of the node's log (or its console output before logging starts)."""
        main = self.log_dir / f"{self.node}.log"
        parts = []
        if main.exists():
            parts.append(f"--- {main}:\n{_tail(main, lines)}")
        parts.append(f"--- {self.console_log}:\n{_tail(self.console_log, lines)}")
        return "\n".join(parts)

    # -- internals

    def _boot(self, timeout_s: float) -> str | None:
        """Start the VM and wait for the broker; None on success, else what went wrong."""
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        self._console = self.console_log.open("ab")
        self._process = subprocess.Popen(
            [str(self.scripts_dir / "rabbitmq-server")], env=self.env(), cwd=self.root,
            stdin=subprocess.DEVNULL, stdout=self._console, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = self._process
        # The pid file is written once Erlang distribution is up (~1 s in); from then on
        # rabbitmqctl can reach the node and wait for the rest of the boot.
        deadline = time.monotonic() + timeout_s
        if not _wait_until(
            lambda: process.poll() is not None or (self.pid or 0) > 0, timeout_s
        ):
            return f"RabbitMQ wrote no pid file in {timeout_s} s\n{self.log()}"
        if process.poll() is not None:
            return f"RabbitMQ exited with {process.returncode} while booting\n{self.log()}"
        remaining = max(deadline - time.monotonic(), 5.0)
        try:
            self.ctl("await_startup", "--timeout", str(int(remaining)),
                     timeout_s=remaining + 15)
        except ServerError as exc:
            return str(exc)
        if not _wait_until(lambda: _port_open(self.port), 10):
            return f"RabbitMQ booted but port {self.port} refuses connections\n{self.log()}"
        return None

    def _reap(self, *, kill: bool) -> None:
        """Wait for the server script; kill what is left of its session (VM helpers)."""
        process = self._process
        if process is not None:
            if kill:
                for pid in _session_members(process.pid):
                    _kill_quietly(pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
            self._process = None
        if self._console is not None:
            self._console.close()
            self._console = None

    def _stop_epmd(self) -> None:
        epmd = shutil.which("epmd")
        if epmd is None:
            return
        with contextlib.suppress(ServerError):
            _run([epmd, "-port", str(self.epmd_port), "-kill"], env=self.env(),
                 timeout_s=10)
