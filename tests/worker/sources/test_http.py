"""http(s) downloads through ``fetch`` against a real server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.worker.errors import RunError
from services.worker.sources.fetch import Conditional, Download, fetch
from services.worker.sources.guard import UrlPolicy
from services.worker.sources.http import Retry, SizeLimits, Timeouts
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


# --- Content-Encoding and size limits ------------------------------------------------------

#: Compresses well but not trivially, and spans several 256 KiB wire chunks once inflated.
PLAIN = b"number,street\n" + b"".join(b"%d,Main St\n" % i for i in range(200_000))


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def no_download_left(workdir: Path) -> bool:
    return not list(workdir.glob("download*"))


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),  # zlib-wrapped, as RFC 9110 says
        ("deflate", raw_deflate),  # raw, as many servers send it
    ],
    ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw"],
)
def test_encoded_body_downloads_to_the_same_bytes_and_fingerprint(
    server: DataServer, tmp_path: Path, coding: str, encode: Any
) -> None:
    plain_url = server.add("/enc/plain.csv", PLAIN, content_type="text/csv")
    url = server.add(
        f"/enc/{coding}-{encode.__name__}.csv",
        encode(PLAIN),
        content_type="text/csv",
        headers={"Content-Encoding": coding},
    )
    plain = get(plain_url, tmp_path / "plain")
    got = get(url, tmp_path / "encoded")
    assert got.path.read_bytes() == PLAIN
    assert got.fingerprint == plain.fingerprint == hashlib.md5(PLAIN).hexdigest()
    assert got.size_bytes == len(PLAIN)
    assert server.requests[-1].headers["Accept-Encoding"] == "gzip, deflate"


def test_gzip_body_inflating_past_the_limit_fails(server: DataServer, tmp_path: Path) -> None:
    bomb = gzip.compress(bytes(50_000_000))
    assert len(bomb) < 100_000
    url = server.add("/enc/bomb.csv", bomb, headers={"Content-Encoding": "gzip"})
    with pytest.raises(RunError) as caught:
        get(url, tmp_path, limits=SizeLimits(max_unpacked_bytes=1_000_000))
    error = caught.value
    assert error.problem == "download_failed" and error.over_limit and not error.transient
    assert url in str(error)
    assert "limit of 1000000 bytes (MAX_UNPACKED_BYTES)" in str(error)
    assert no_download_left(tmp_path)
    assert server.count("/enc/bomb.csv") == 1  # a limit is final: no retries


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_download_limit_fails(
    server: DataServer, tmp_path: Path, chunked: bool
) -> None:
    url = server.add(f"/big-{chunked}.csv", PLAIN, chunked=chunked)
    with pytest.raises(RunError) as caught:
        get(url, tmp_path, limits=SizeLimits(max_download_bytes=500_000))
    error = caught.value
    assert error.problem == "download_failed" and error.over_limit
    assert url in str(error) and "limit of 500000 bytes (MAX_DOWNLOAD_BYTES)" in str(error)
    assert no_download_left(tmp_path)


def test_encoded_body_counts_its_wire_bytes(server: DataServer, tmp_path: Path) -> None:
    encoded = gzip.compress(PLAIN)
    url = server.add("/enc/wire.csv", encoded, headers={"Content-Encoding": "gzip"}, chunked=True)
    limit = len(encoded) // 2
    with pytest.raises(RunError, match=f"limit of {limit} bytes \\(MAX_DOWNLOAD_BYTES\\)"):
        get(url, tmp_path, limits=SizeLimits(max_download_bytes=limit))
    assert no_download_left(tmp_path)
    # Within both limits it is fine: the inflated size counts against the unpacked limit only.
    got = get(url, tmp_path, limits=SizeLimits(len(encoded), len(PLAIN)))
    assert got.path.read_bytes() == PLAIN


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, gzip"])
def test_unknown_content_encoding_fails_clearly(
    server: DataServer, tmp_path: Path, coding: str
) -> None:
    url = server.add(
        f"/enc/{coding}.csv", b"\x00\x01 not for us", headers={"Content-Encoding": coding}
    )
    with pytest.raises(RunError) as caught:
        get(url, tmp_path)
    error = caught.value
    assert error.problem == "download_failed" and not error.transient
    assert f"Content-Encoding {coding!r}" in str(error) and url in str(error)
    assert no_download_left(tmp_path)


def test_corrupt_gzip_body_fails_at_once(server: DataServer, tmp_path: Path) -> None:
    url = server.add(
        "/enc/corrupt.csv", b"\x1f\x8b" + b"\xff" * 100, headers={"Content-Encoding": "gzip"}
    )
    with pytest.raises(RunError, match="gzip-encoded body is corrupt"):
        get(url, tmp_path)
    assert server.count("/enc/corrupt.csv") == 1
    assert no_download_left(tmp_path)


def test_truncated_gzip_body_is_retried_then_transient(server: DataServer, tmp_path: Path) -> None:
    whole = gzip.compress(PLAIN)
    url = server.add("/enc/cut.csv", whole[: len(whole) // 2], headers={"Content-Encoding": "gzip"})
    with pytest.raises(RunError) as caught:
        get(url, tmp_path)
    assert "truncated" in str(caught.value) and caught.value.transient
    assert server.count("/enc/cut.csv") == QUICK.tries
    assert no_download_left(tmp_path)


# --- transient or not ------------------------------------------------------------------------


def test_retries_used_up_on_5xx_are_transient(server: DataServer, tmp_path: Path) -> None:
    url = server.add("/always-503.csv", b"", failures=[503] * 10)
    with pytest.raises(RunError) as caught:
        get(url, tmp_path)
    assert caught.value.transient and not caught.value.over_limit


def test_404_is_not_transient(server: DataServer, tmp_path: Path) -> None:
    with pytest.raises(RunError) as caught:
        get(server.url("/nothing-here.csv"), tmp_path)
    assert not caught.value.transient
