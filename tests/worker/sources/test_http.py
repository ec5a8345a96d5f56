"""http(s) downloads through ``fetch`` against a real server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.worker.errors import RunError
from services.worker.sources.fetch import Conditional, Download, fetch
from services.worker.sources.guard import UrlPolicy
from services.worker.sources.http import Retry, Timeouts
from tests.support.dataserver import DataServer

LOCAL = UrlPolicy(allow_private=True)
QUICK = Retry(tries=3, backoff_s=0.01)
SHORT = Timeouts(connect_s=2.0, sock_read_s=0.3)


@pytest.fixture(scope="module")
def server() -> Iterator[DataServer]:
    with DataServer().running() as running:
        yield running


def get(url: str, workdir: Path, **options: Any) -> Download:
    entry = {"data": url, "protocol": "http", **options.pop("entry", {})}
    options.setdefault("policy", LOCAL)
    options.setdefault("retry", QUICK)
    options.setdefault("timeouts", SHORT)
    return fetch(entry, workdir, **options)


def test_download_lands_on_disk_with_fingerprint(server: DataServer, tmp_path: Path) -> None:
    body = b"number,street\n1,Main St\n"
    url = server.add("/ok/addresses.csv", body, content_type="text/csv")
    got = get(url, tmp_path)
    assert got.path == tmp_path / "download.csv"
    assert got.path.read_bytes() == body
    assert got.fingerprint == hashlib.md5(body).hexdigest()
    assert got.size_bytes == len(body)
    assert got.content_type == "text/csv"
    assert not got.not_modified


def test_suffix_from_content_type_when_url_has_none(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/ok/export", b"PK\x05\x06" + bytes(18), content_type="application/zip")
    assert get(url, tmp_path).path.name == "download.zip"


def test_404_fails_at_once(server: DataServer, tmp_path: Path) -> None:
    url = server.url("/missing.csv")
    with pytest.raises(RunError) as caught:
        get(url, tmp_path)
    assert caught.value.problem == "download_failed"
    assert "404" in str(caught.value) and url in str(caught.value)
    assert server.count("/missing.csv") == 1


def test_500_then_success_is_retried(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/flaky.csv", b"a\n1\n", failures=[500, 503])
    got = get(url, tmp_path)
    assert got.path.read_bytes() == b"a\n1\n"
    assert server.count("/flaky.csv") == 3


def test_persistent_500_gives_up_after_the_tries(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/broken.csv", b"", failures=[500] * 10)
    with pytest.raises(RunError) as caught:
        get(url, tmp_path)
    assert "after 3 tries" in str(caught.value) and "HTTP 500" in str(caught.value)
    assert server.count("/broken.csv") == 3


def test_idle_connection_times_out(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/idle.csv", b"x" * 100, stall_after_bytes=10, stall_s=5.0)
    started = time.monotonic()
    with pytest.raises(RunError) as caught:
        get(url, tmp_path, retry=Retry(tries=1))
    assert "timed out" in str(caught.value)
    assert time.monotonic() - started < 3.0


def test_conditional_get_gives_not_modified(server: DataServer, tmp_path: Path) -> None:
    stamp = "Wed, 21 Oct 2015 07:28:00 GMT"
    url = server.add("/cond.csv", b"a\n", etag='"v1"', last_modified=stamp)
    first = get(url, tmp_path / "1")
    assert (first.etag, first.last_modified) == ('"v1"', stamp)

    earlier = Conditional(
        etag=first.etag, last_modified=first.last_modified, fingerprint=first.fingerprint
    )
    second = get(url, tmp_path / "2", conditional=earlier)
    assert second.not_modified
    assert second.fingerprint == first.fingerprint
    assert not second.path.exists()
    sent = server.requests[-1].headers
    assert sent["If-None-Match"] == '"v1"' and sent["If-Modified-Since"] == stamp


def test_changed_file_is_downloaded_despite_conditional(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/changed.csv", b"new\n", etag='"v2"')
    got = get(url, tmp_path, conditional=Conditional('"v1"', None, "old"))
    assert not got.not_modified and got.path.read_bytes() == b"new\n" and got.etag == '"v2"'


def test_source_headers_and_user_agent_are_sent(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/keyed.csv", b"a\n", required_headers={"X-Api-Key": "k1"})
    with pytest.raises(RunError, match="403"):
        get(url, tmp_path)
    got = get(url, tmp_path, entry={"request": {"headers": {"X-Api-Key": "k1"}}})
    assert got.path.read_bytes() == b"a\n"
    agent = server.requests[-1].headers["User-Agent"]
    assert agent.startswith("oa-machine/")
    assert "(+https://github.com/openaddresses/openaddresses)" in agent


def test_request_method_is_used(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/post.csv", b"a\n")
    get(url, tmp_path, entry={"request": {"method": "post"}})
    assert server.requests[-1].method == "POST"


def test_progress_is_called_as_bytes_arrive(server: DataServer, tmp_path: Path) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, several chunks
    url = server.add("/big.bin", body)
    seen: list[int] = []
    got = get(url, tmp_path, progress=seen.append)
    assert len(seen) > 1
    assert seen == sorted(seen) and seen[-1] == got.size_bytes == len(body)


def test_redirects_are_followed(server: DataServer, tmp_path: Path) -> None:
    target = server.add("/moved/new.csv", b"here\n")
    url = server.add("/old.csv", redirect_to=target)
    assert get(url, tmp_path).path.read_bytes() == b"here\n"


def test_loopback_is_refused_without_allow_private(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/private.csv", b"a\n")
    with pytest.raises(RunError) as caught:
        get(url, tmp_path, policy=UrlPolicy())
    assert caught.value.problem == "download_failed" and "loopback" in str(caught.value)
    assert server.count("/private.csv") == 0


def test_file_urls_only_when_allowed(tmp_path: Path) -> None:
    source = tmp_path / "local.CSV"
    source.write_bytes(b"a\n1\n")
    for url in (source.as_uri(), str(source)):
        with pytest.raises(RunError, match="local files are not allowed"):
            get(url, tmp_path / "out", policy=UrlPolicy())
        got = get(url, tmp_path / "out", policy=UrlPolicy(allow_files=True))
        assert got.path.read_bytes() == b"a\n1\n" and got.path.suffix == ".csv"
        assert got.fingerprint == hashlib.md5(b"a\n1\n").hexdigest()


def test_unknown_protocol(tmp_path: Path) -> None:
    with pytest.raises(RunError) as caught:
        fetch({"data": "gopher://x/y", "protocol": "gopher"}, tmp_path, policy=LOCAL)
    assert caught.value.problem == "unknown_protocol"


def test_redirect_to_a_file_url_is_refused(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/sneaky.csv", redirect_to="file:///etc/passwd")
    with pytest.raises(RunError, match="redirected to a file URL"):
        get(url, tmp_path, policy=UrlPolicy(allow_private=True, allow_files=True))
    assert not list(tmp_path.glob("download*"))
