"""JSON requests to one ArcGIS layer: one request at a time in a host slot, ArcGIS errors.

Every request holds a slot of the layer's host (:mod:`services.worker.sources.hosts`) while it
is in flight, the metadata and counts as much as the pages, and only then: a request waiting
to be tried again holds none. A throttled answer (429, 503) pauses the whole host.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aiohttp
from yarl import URL

from services.worker.errors import RunError
from services.worker.sources.guard import UrlPolicy, redact
from services.worker.sources.hosts import HostSlots
from services.worker.sources.http import (
    DEFAULT_LIMITS,
    Retry,
    RetryableError,
    SizeLimits,
    open_response,
    read_body,
    status_error,
    with_retries,
)

JSON = dict[str, Any]
TOKEN_ERROR_CODES = frozenset({498, 499})
# Past this many characters of parameters a GET URL risks a 414 from the server or a proxy.
MAX_GET_PARAM_CHARS = 1500
#: Statuses with which ArcGIS servers (or their proxies) give up on a page too large to build
#: in time; timeouts and "transfer limit" errors say the same.
TOO_LARGE_STATUSES = frozenset({500, 502, 504})


def _is_token_error(error: Mapping[str, Any]) -> bool:
    message = f"{error.get('message', '')} {error.get('details', '')}".lower()
    return error.get("code") in TOKEN_ERROR_CODES or "token" in message


def suggests_smaller_page(exc: RetryableError) -> bool:
    """Whether a failed page might succeed smaller (not throttling, not a bad answer)."""
    return (
        exc.timed_out or exc.status in TOO_LARGE_STATUSES or "transfer limit" in str(exc).lower()
    )


class LayerClient:
    """Requests to one layer, each in a slot of its host."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        policy: UrlPolicy,
        headers: Mapping[str, str],
        retry: Retry,
        slots: HostSlots,
        limits: SizeLimits = DEFAULT_LIMITS,
    ) -> None:
        parts = urlsplit(url)
        # A query string in the source URL (a token, a definition query) goes on every request.
        self.base_params = dict(parse_qsl(parts.query))
        self.layer_url = urlunsplit(parts._replace(query="", fragment="")).rstrip("/")
        self.shown = redact(self.layer_url)
        self.retry = retry
        self._session = session
        self._policy = policy
        self._headers = dict(headers)
        self._slots = slots
        self._limits = limits

    async def get(self, path: str, params: Mapping[str, str]) -> JSON:
        """One answer, tried again on retryable failures (``retry``)."""
        return await with_retries(lambda: self.once(path, params), self.retry, self.shown)

    async def once(self, path: str, params: Mapping[str, str]) -> JSON:
        """One try; raises ``RetryableError`` or ``RunError``.

        Long parameter lists (object ids) are posted as a form instead of a query string.
        """
        url = self.layer_url + path
        query = {**self.base_params, **params}
        post = sum(len(k) + len(v) for k, v in query.items()) > MAX_GET_PARAM_CHARS
        async with self._slots.slot():
            try:
                async with open_response(
                    self._session,
                    "POST" if post else "GET",
                    url if post else str(URL(url).with_query(query)),
                    policy=self._policy,
                    headers=self._headers,
                    data=query if post else None,
                ) as response:
                    # Bounded: a page is held in memory whole.
                    body = await read_body(response, self.shown, self._limits)
                    return self._parse(response, body)
            except RetryableError as exc:
                if exc.throttled:
                    self._slots.pause(self.retry.wait_s(1, exc.retry_after_s))
                raise

    def _parse(self, response: aiohttp.ClientResponse, body: bytes) -> JSON:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        except RecursionError as exc:
            # No layer nests its JSON hundreds deep; this is a broken or hostile server.
            raise RunError(
                f"download failed, {self.shown}: the answer is JSON nested too deeply to read",
                "download_failed",
            ) from exc
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            self._raise_arcgis_error(data["error"])
        if response.status >= 400:
            raise status_error(self.shown, response)
        if not isinstance(data, dict):
            # Often a truncated answer or an HTML error page from a proxy: try again.
            raise RetryableError(f"{self.shown}: the answer is not a JSON object")
        return data

    def _raise_arcgis_error(self, error: Mapping[str, Any]) -> None:
        code = error.get("code")
        text = f"{error.get('message', '')}"
        message = f"{self.shown}: ArcGIS error {code}: {text}"
        if _is_token_error(error):
            raise RunError(f"the layer needs a token, {message}", "no_esri_token")
        if isinstance(code, int) and code >= 500:
            raise RetryableError(message, status=code if code < 600 else 500)
        if "transfer limit" in text.lower():
            # Some servers refuse a page too large this way rather than with a 500.
            raise RetryableError(message)
        raise RunError(f"download failed, {message}", "download_failed")
