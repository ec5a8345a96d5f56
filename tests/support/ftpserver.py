"""A real FTP server (pyftpdlib) on 127.0.0.1, serving a folder from a thread::

    with FtpServer(tmp_path) as server:
        anonymous = server.url("data/a.csv")
        with_login = server.url("data/a.csv", login=True)   # ftp://oa:secret@127.0.0.1:port/...

Anonymous users and ``user``/``password`` both read ``root``; nobody may write.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

with warnings.catch_warnings():
    # pyftpdlib is built on asyncore/asynchat, deprecated in 3.11; it is only a test fixture.
    warnings.simplefilter("ignore", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.ioloop import IOLoop
    from pyftpdlib.servers import FTPServer

# pyftpdlib logs every command at INFO; tests read better without it.
logging.getLogger("pyftpdlib").setLevel(logging.WARNING)


class FtpServer:
    def __init__(self, root: Path, *, user: str = "oa", password: str = "secret") -> None:
        self.root = root
        self.user = user
        self.password = password
        self._server: FTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    def url(self, path: str, *, login: bool = False) -> str:
        userinfo = f"{quote(self.user)}:{quote(self.password)}@" if login else ""
        return f"ftp://{userinfo}127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self) -> Self:
        authorizer = DummyAuthorizer()
        authorizer.add_user(self.user, self.password, str(self.root), perm="elr")
        authorizer.add_anonymous(str(self.root), perm="elr")
        # No pause after a failed login: pyftpdlib's default of 3 s would slow tests down.
        handler = type(
            "Handler", (FTPHandler,), {"authorizer": authorizer, "auth_failed_timeout": 0.01}
        )
        # Its own loop: pyftpdlib's default loop is process-wide, and closing one server
        # would close every other server's sockets with it.
        self._server = FTPServer(("127.0.0.1", 0), handler, ioloop=IOLoop())
        self._port = int(self._server.socket.getsockname()[1])
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="FtpServer", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        # The server is closed from its own thread: pyftpdlib's loop is not thread-safe.
        server = self._server
        assert server is not None
        while not self._stopping.is_set():
            server.serve_forever(timeout=0.05, blocking=False, handle_exit=False)
        server.close_all()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
