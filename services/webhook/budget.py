"""A budget of bytes for request bodies that are not verified yet.

Before its signature is checked, a body is anyone's: at most :attr:`ByteBudget.total_bytes` of
such bodies are read at once. A delivery reserves its ``Content-Length`` (or the largest body
GitHub sends, when it announces none) and gives it back once the signature is checked, so the
small deliveries GitHub sends every minute pass at once while a flood of large unsigned posts
waits its turn.
"""

from __future__ import annotations

import asyncio


class ByteBudget:
    """Reservations of bytes out of ``total_bytes``; one larger than the whole is let through
    alone."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.used_bytes = 0
        self._changed = asyncio.Condition()

    async def acquire(self, size_bytes: int) -> None:
        """Wait until ``size_bytes`` fit in the budget, then hold them."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: self.used_bytes == 0 or self.used_bytes + size_bytes <= self.total_bytes
            )
            self.used_bytes += size_bytes

    async def release(self, size_bytes: int) -> None:
        """Give back what :meth:`acquire` held."""
        async with self._changed:
            self.used_bytes -= size_bytes
            self._changed.notify_all()
