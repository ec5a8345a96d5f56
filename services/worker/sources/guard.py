"""Which URLs a run may fetch.

A source JSON is written by anyone with a pull request, so its URL is untrusted input: it must
not reach the worker's own network (metadata endpoints, the database, the broker) nor its
local disk. ``check_url`` rejects what can be seen in the URL itself; ``GuardedResolver``
re-checks every address a host name resolves to at connect time, so a name that resolves to a
public address when checked and to a private one when connecting (DNS rebinding) is refused
as well.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from services.worker.errors import RunError

if TYPE_CHECKING:
    from services.worker.sources.resolver import GuardedResolver as GuardedResolver

# GuardedResolver lives in sources.resolver because it subclasses aiohttp's AbstractResolver,
# and importing aiohttp costs ~0.12 s that a run of a local file must not pay: every run's
# child imports this module (UrlPolicy, check_url). It is still importable from here.

NETWORK_SCHEMES = frozenset({"http", "https", "ftp"})
# Names that always mean this machine, whatever a resolver says.
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class UrlPolicy:
    """What a run may reach.

    ``allow_files`` is for ``process-one`` on a developer's machine only; ``allow_private`` for
    tests and local set-ups. The service runs with both off.
    """

    allow_files: bool = False
    allow_private: bool = False


class ForbiddenAddressError(RunError):
    """A host resolved to an address the policy forbids.

    Not an ``OSError`` on purpose: aiohttp wraps resolver ``OSError``s into connection errors,
    which the downloader retries; a forbidden address must fail the run at once.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, "download_failed")


def is_local_path(url: str) -> bool:
    """True for ``file://`` URLs and bare paths (no scheme, or a Windows drive letter)."""
    scheme = urlsplit(url).scheme.lower()
    return scheme == "file" or scheme == "" or len(scheme) == 1


def forbidden_reason(address: IPAddress) -> str | None:
    """Why a run may not connect to ``address``, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # ::ffff:127.0.0.1 reaches 127.0.0.1.
        return forbidden_reason(address.ipv4_mapped)
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_private:
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        # Shared address space (100.64.0.0/10) and similar non-routable ranges.
        return "a non-global address"
    return None


def check_address(address: str, policy: UrlPolicy, *, host: str) -> None:
    """Refuse a resolved ``address`` for ``host`` unless the policy allows it."""
    if policy.allow_private:
        return
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError as exc:
        raise ForbiddenAddressError(
            f"{host} resolved to an unparseable address {address!r}"
        ) from exc
    reason = forbidden_reason(ip)
    if reason is not None:
        raise ForbiddenAddressError(
            f"refusing to connect to {host} ({address}): {reason} is not allowed"
        )


def check_url(url: str, policy: UrlPolicy) -> None:
    """Refuse ``url`` unless ``policy`` allows its scheme and host.

    Host names are not resolved here (that happens, and is checked, at connect time); literal
    addresses and the names of this machine are refused here because aiohttp connects to a
    literal address without asking the resolver.
    """
    if is_local_path(url):
        if not policy.allow_files:
            raise RunError(
                f"refusing local file {redact(url)!r}: local files are not allowed here",
                "download_failed",
            )
        return
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in NETWORK_SCHEMES:
        raise RunError(
            f"refusing {redact(url)!r}: scheme {scheme!r} is not one of http, https, ftp",
            "download_failed",
        )
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise RunError(f"refusing {redact(url)!r}: no host", "download_failed")
    if policy.allow_private:
        return
    if host in LOCAL_NAMES or host.endswith(".localhost"):
        raise RunError(f"refusing {redact(url)!r}: {host} is this machine", "download_failed")
    try:
        # An IPv6 zone ("fe80::1%eth0") does not change which address it is.
        ip = ipaddress.ip_address(unquote(host).split("%", 1)[0])
    except ValueError:
        return
    reason = forbidden_reason(ip)
    if reason is not None:
        raise RunError(f"refusing {redact(url)!r}: {reason} is not allowed", "download_failed")


def resolve_checked(host: str, port: int, policy: UrlPolicy) -> list[str]:
    """Resolve ``host`` (blocking) and return its addresses, refusing forbidden ones.

    For ftplib, which has no resolver hook: the caller connects to a returned address, not to
    the name, so the name cannot resolve differently between check and connect.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RunError(f"cannot resolve {host}: {exc}", "download_failed") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        check_address(address, policy, host=host)
    return addresses


def connector_kwargs(policy: UrlPolicy) -> dict[str, Any]:
    """Keyword arguments for an ``aiohttp.TCPConnector`` that enforces ``policy``."""
    from services.worker.sources.resolver import GuardedResolver  # deferred, see above

    return {"resolver": GuardedResolver(policy), "use_dns_cache": False}


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def __getattr__(name: str) -> Any:
    # ``from services.worker.sources.guard import GuardedResolver`` still works, importing
    # aiohttp only then.
    if name == "GuardedResolver":
        from services.worker.sources.resolver import GuardedResolver

        return GuardedResolver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
