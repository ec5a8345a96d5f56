"""GitHub webhook signatures: HMAC-SHA256 of the raw body, any of the configured secrets."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

_PREFIX = "sha256="


def sign(body: bytes, secret: str) -> str:
    """The ``X-Hub-Signature-256`` value GitHub would send for ``body``."""
    return _PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secrets: Sequence[str]) -> bool:
    """True when ``header`` is a valid signature of ``body`` under one of ``secrets``.

    Every secret is tried with a constant-time compare (several secrets allow rotation); an
    empty secret list accepts nothing.
    """
    if not header or not header.startswith(_PREFIX):
        return False
    matched = False
    for secret in secrets:
        # No early exit: the time taken does not reveal which secret matched.
        matched |= hmac.compare_digest(sign(body, secret), header)
    return matched


class SignatureCheck:
    """:func:`verify_signature` fed chunk by chunk, so a body is checked as it arrives and a
    refused one never has to be held whole."""

    def __init__(self, secrets: Sequence[str]) -> None:
        self._macs = [hmac.new(secret.encode(), digestmod=hashlib.sha256) for secret in secrets]

    def update(self, chunk: bytes) -> None:
        """Add the next part of the body."""
        for mac in self._macs:
            mac.update(chunk)

    def matches(self, header: str | None) -> bool:
        """True when ``header`` signs everything given to :meth:`update`."""
        if not header or not header.startswith(_PREFIX):
            return False
        matched = False
        for mac in self._macs:
            matched |= hmac.compare_digest(_PREFIX + mac.hexdigest(), header)
        return matched
