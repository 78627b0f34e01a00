"""What every registry answer goes through: the internal retry signal, Retry-After, the status mapping.

The layer below token auth and the request primitives: both map a refused answer the same way here.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp

from bot.errors import PermanentError


class _Retryable(Exception):
    """Internal signal to stamina; turned into TransientError before it leaves the client.

    `delay`: the seconds the registry asked for (429/503 `Retry-After`), waited instead of the backoff."""

    def __init__(self, host: str, detail: str, *, delay: float | None = None) -> None:
        super().__init__(f"{host}: {detail}")
        self.host = host
        self.detail = detail
        self.delay = delay


def retry_after(value: str | None, *, cap: float) -> float | None:
    """A `Retry-After` header (delta-seconds or an HTTP date) as seconds to wait, at most `cap`."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            at = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if at.tzinfo is None:
            return None
        seconds = (at - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), cap)


def _on_retryable(exc: Exception) -> bool | float:
    """stamina's hook: retry a _Retryable, after the registry's own Retry-After when it gave one."""
    if isinstance(exc, _Retryable):
        return exc.delay if exc.delay is not None else True
    return False


def _error_text(body: bytes) -> str:
    """The registry's own error codes, short: bodies can be large and must not flood messages."""
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        text = body[:200].decode("utf-8", "replace")
    return text[:300]


async def _raise_for_refusal(
    r: aiohttp.ClientResponse,
    host: str,
    *,
    cap: float,
    denied: Callable[[int, bytes], PermanentError],
    retry: Callable[[int, bytes], str],
) -> None:
    """The one status mapping for registry answers: 401/403 -> `denied(status, body)`; 5xx/429 ->
    _Retryable for `host` with `retry(status, body)` as its detail, after the Retry-After the registry
    sent (at most `cap` seconds). Any other status returns for the caller to judge. The body of a
    refused answer is read and the response released."""
    if r.status not in (401, 403) and r.status < 500 and r.status != 429:
        return
    body = await r.read()
    r.release()
    if r.status in (401, 403):
        raise denied(r.status, body)
    raise _Retryable(host, retry(r.status, body), delay=retry_after(r.headers.get("Retry-After"), cap=cap))
