"""The connect-time half of the URL policy: an aiohttp resolver that re-checks addresses.

Kept apart from :mod:`services.worker.sources.guard` so that checking a URL does not import
aiohttp (~0.12 s); only the http and ESRI downloads need this.
"""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from services.worker.sources.guard import (
    LOCAL_NAMES,
    ForbiddenAddressError,
    UrlPolicy,
    check_address,
)


class GuardedResolver(AbstractResolver):
    """A resolver that refuses a host when any of its addresses is forbidden.

    Refusing the whole host (not just filtering the bad addresses) keeps the rule simple: a
    name that points at both a public and an internal address is suspicious in itself.
    """

    def __init__(self, policy: UrlPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.rstrip(".").lower() in LOCAL_NAMES and not self._policy.allow_private:
            raise ForbiddenAddressError(f"refusing to connect to {host}: it is this machine")
        for result in results:
            check_address(result["host"], self._policy, host=host)
        return results

    async def close(self) -> None:
        await self._inner.close()
