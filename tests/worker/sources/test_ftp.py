"""FTP downloads against a real pyftpdlib server on 127.0.0.1."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.worker.errors import RunError
from services.worker.sources.fetch import fetch
from services.worker.sources.guard import UrlPolicy
from services.worker.sources.http import Retry, SizeLimits, Timeouts
from tests.support.ftpserver import FtpServer

LOCAL = UrlPolicy(allow_private=True)
QUICK = Retry(tries=2, backoff_s=0.01)
SHORT = Timeouts(connect_s=2.0, sock_read_s=2.0)
BODY = b"number,street\n" + b"1,Main St\n" * 50_000


@pytest.fixture(scope="module")
def ftp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FtpServer]:
    root = tmp_path_factory.mktemp("ftproot")
    (root / "pub").mkdir()
    (root / "pub" / "addresses.csv").write_bytes(BODY)
    with FtpServer(root) as server:
        yield server


@pytest.mark.parametrize("login", [False, True])
def test_ftp_download(ftp_server: FtpServer, tmp_path: Path, login: bool) -> None:
    seen: list[int] = []
    entry = {"data": ftp_server.url("pub/addresses.csv", login=login), "protocol": "ftp"}
    got = fetch(entry, tmp_path, policy=LOCAL, progress=seen.append, retry=QUICK, timeouts=SHORT)
    assert got.path == tmp_path / "download.csv"
    assert got.path.read_bytes() == BODY
    assert got.fingerprint == hashlib.md5(BODY).hexdigest() and got.size_bytes == len(BODY)
    assert seen[-1] == len(BODY)


def test_missing_file_fails_at_once(ftp_server: FtpServer, tmp_path: Path) -> None:
    entry = {"data": ftp_server.url("pub/nope.csv", login=True), "protocol": "ftp"}
    with pytest.raises(RunError) as caught:
        fetch(entry, tmp_path, policy=LOCAL, retry=QUICK, timeouts=SHORT)
    assert caught.value.problem == "download_failed" and not caught.value.transient
    assert "550" in str(caught.value)
    assert "secret" not in str(caught.value)  # the password is not shown


def test_wrong_password_fails(ftp_server: FtpServer, tmp_path: Path) -> None:
    url = ftp_server.url("pub/addresses.csv").replace("ftp://", "ftp://oa:wrong@")
    with pytest.raises(RunError, match="530"):
        fetch({"data": url, "protocol": "ftp"}, tmp_path, policy=LOCAL, retry=QUICK, timeouts=SHORT)


def test_ftp_loopback_refused_by_default(ftp_server: FtpServer, tmp_path: Path) -> None:
    entry = {"data": ftp_server.url("pub/addresses.csv"), "protocol": "ftp"}
    with pytest.raises(RunError, match="loopback"):
        fetch(entry, tmp_path, policy=UrlPolicy())


def test_closed_port_is_retried_then_fails(tmp_path: Path) -> None:
    server = FtpServer(tmp_path).start()
    url = server.url("a.csv")
    server.stop()
    with pytest.raises(RunError, match="after 2 tries") as caught:
        fetch({"data": url, "protocol": "ftp"}, tmp_path, policy=LOCAL, retry=QUICK, timeouts=SHORT)
    assert caught.value.transient  # the whole run may be tried again later


def test_http_protocol_with_ftp_url_uses_ftp(ftp_server: FtpServer, tmp_path: Path) -> None:
    entry = {"data": ftp_server.url("pub/addresses.csv"), "protocol": "http"}
    got = fetch(entry, tmp_path, policy=LOCAL, retry=QUICK, timeouts=SHORT)
    assert got.path.read_bytes() == BODY


def test_file_over_the_download_limit_fails(ftp_server: FtpServer, tmp_path: Path) -> None:
    url = ftp_server.url("pub/addresses.csv")
    limits = SizeLimits(max_download_bytes=len(BODY) // 2)
    with pytest.raises(RunError) as caught:
        fetch(
            {"data": url, "protocol": "ftp"},
            tmp_path,
            policy=LOCAL,
            retry=QUICK,
            timeouts=SHORT,
            limits=limits,
        )
    error = caught.value
    assert error.problem == "download_failed" and error.over_limit and not error.transient
    assert url in str(error)
    assert f"limit of {len(BODY) // 2} bytes (MAX_DOWNLOAD_BYTES)" in str(error)
    assert not list(tmp_path.glob("download*"))
    # The server is still fine for the next download (the cut transfer left nothing behind).
    got = fetch({"data": url, "protocol": "ftp"}, tmp_path, policy=LOCAL, retry=QUICK)
    assert got.path.read_bytes() == BODY
