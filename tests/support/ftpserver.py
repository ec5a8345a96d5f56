"""A real FTP server (pyftpdlib) on 127.0.0.1, serving a folder from a thread::

    with FtpServer(tmp_path) as server:
        anonymous = server.url("data/a.csv")
        with_login = server.url("data/a.csv", login=True)   # ftp://oa:secret@127.0.0.1:port/...

Anonymous users and ``user``/``password`` both read ``root``; nobody may write.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
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

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.socket.getsockname()[1])

    def url(self, path: str, *, login: bool = False) -> str:
        userinfo = f"{quote(self.user)}:{quote(self.password)}@" if login else ""
        return f"ftp://{userinfo}127.0.0.1:{self.port}/{path.lstrip('/')}"

    def start(self) -> Self:
        authorizer = DummyAuthorizer()
        authorizer.add_user(self.user, self.password, str(self.root), perm="elr")
        authorizer.add_anonymous(str(self.root), perm="elr")
        handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
        self._server = FTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"timeout": 0.1, "handle_exit": False},
            name="FtpServer",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close_all()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
