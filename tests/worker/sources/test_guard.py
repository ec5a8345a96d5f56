"""URL policy: what is refused before connecting and at connect time."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from services.worker.errors import RunError
from services.worker.sources.guard import GuardedResolver, UrlPolicy, check_url, redact
from tests.support.dataserver import DataServer

SERVICE = UrlPolicy()


@pytest.mark.parametrize(
    "url",
    [
        "https://data.example.org/a.zip",
        "http://93.184.216.34/a.csv",
        "ftp://ftp.example.org/pub/a.zip",
        "https://[2606:4700::1111]/a.csv",
    ],
)
def test_public_urls_pass(url: str) -> None:
    check_url(url, SERVICE)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/a", "loopback"),
        ("http://localhost/a", "this machine"),
        ("http://api.localhost/a", "this machine"),
        ("http://[::1]/a", "loopback"),
        ("http://[::ffff:10.0.0.1]/a", "private"),
        ("http://10.1.2.3/a", "private"),
        ("http://192.168.0.1/a", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://224.0.0.1/a", "multicast"),
        ("http://0.0.0.0/a", "unspecified"),
        ("http://[fe80::1%25eth0]/a", "link-local"),
        ("http://100.64.0.1/a", "non-global"),
        ("gopher://example.org/a", "scheme"),
        ("file:///etc/passwd", "local files"),
        ("/etc/passwd", "local files"),
        ("http:///nohost", "no host"),
    ],
)
def test_forbidden_urls_are_refused_with_a_reason(url: str, reason: str) -> None:
    with pytest.raises(RunError) as caught:
        check_url(url, SERVICE)
    assert caught.value.problem == "download_failed"
    assert reason in str(caught.value)


def test_policy_flags_open_files_and_private_addresses() -> None:
    check_url("file:///tmp/a.csv", UrlPolicy(allow_files=True))
    check_url("/tmp/a.csv", UrlPolicy(allow_files=True))
    check_url("http://127.0.0.1:1/a", UrlPolicy(allow_private=True))
    with pytest.raises(RunError):
        check_url("file:///tmp/a.csv", UrlPolicy(allow_private=True))


def test_redact_hides_passwords() -> None:
    assert redact("ftp://user:pw@host/a") == "ftp://user:***@host/a"
    assert redact("http://host/a?x=1") == "http://host/a?x=1"


class RebindingResolver(AbstractResolver):
    """Answers every name with loopback, as a rebinding DNS server would on the second ask."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        return None


async def test_connect_time_check_refuses_a_name_resolving_to_loopback() -> None:
    async with DataServer() as server:
        server.add("/a", b"secret")
        port = server.base_url.rsplit(":", 1)[1]
        url = f"http://innocent.example:{port}/a"
        check_url(url, SERVICE)  # nothing to see in the URL itself
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(SERVICE, RebindingResolver()), use_dns_cache=False
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(RunError) as caught:
                await session.get(url)
        assert "loopback" in str(caught.value)
        assert server.count("/a") == 0


async def test_connect_time_check_lets_allowed_addresses_through() -> None:
    async with DataServer() as server:
        server.add("/a", b"fine")
        port = server.base_url.rsplit(":", 1)[1]
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(UrlPolicy(allow_private=True), RebindingResolver()),
            use_dns_cache=False,
        )
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"http://innocent.example:{port}/a") as response,
        ):
            assert await response.read() == b"fine"
