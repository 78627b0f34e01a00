"""Live checks of an env's service endpoints: the relay speaks Nostr (NIP-11, NIP-01) and the API answers /health.

A relay can serve its landing page while its websocket or its storage is broken, so the relay is asked
what only a working relay can answer: its information document (NIP-11) shows the version it runs, and a
`REQ` for one event is answered by `EOSE` (NIP-01). Read-only by design: the bot never sends `EVENT`.
Every check returns a result and never raises for anything the far end does; the relay's own words
(a NOTICE, a CLOSED reason, an HTTP status) go into the message, clipped.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import aiohttp

from bot.adapters.site import version_matches
from bot.settings import Endpoints

_MAX_DOC = 64 << 10  # a relay information document is a few hundred bytes
_MAX_MESSAGE = 1 << 20  # one relay message (an EVENT) stays far below this
_MAX_WORDS = 200  # how much of what a far end said goes into a message

NIP11 = "relay NIP-11"
REQ = "relay REQ→EOSE"
HEALTH = "api /health"
Status = Literal["ok", "skipped", "failed"]


@dataclass(frozen=True)
class EndpointCheck:
    check: str  # NIP11 | REQ | HEALTH
    status: Status
    message: str  # says which check, what was asked and what the far end answered
    url: str | None = None
    version: str | None = None  # NIP-11's `version`, when the document has one
    latency_ms: float | None = None  # REQ sent → EOSE received; or the /health round trip

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _words(text: object) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= _MAX_WORDS else flat[: _MAX_WORDS - 1] + "…"


def _unreachable(url: str, limit: float, e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return f"{url} did not answer within {limit:g}s"
    return f"{url} could not be reached ({type(e).__name__}: {_words(e)})"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


async def check_relay_info(
    url: str | None, expected_short: str, *, session: aiohttp.ClientSession, limit: float
) -> EndpointCheck:
    """NIP-11: the relay information document answers, and its version (if it shows one) is the expected commit."""
    if not url:
        return EndpointCheck(NIP11, "skipped", f"{NIP11} skipped: no endpoints.relay_ws configured")
    try:
        async with (
            asyncio.timeout(limit),
            session.get(url, headers={"Accept": "application/nostr+json"}, allow_redirects=True) as resp,
        ):
            status = resp.status
            body = await resp.content.read(_MAX_DOC)
    except (TimeoutError, aiohttp.ClientError) as e:
        return EndpointCheck(NIP11, "failed", f"{NIP11}: {_unreachable(url, limit, e)}", url)
    if not 200 <= status < 300:
        text = _words(body.decode("utf-8", "replace"))
        return EndpointCheck(NIP11, "failed", f"{NIP11}: {url} answered {status}: {text or 'no body'}", url)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return EndpointCheck(
            NIP11,
            "failed",
            f"{NIP11}: {url} answered {status} but not with a relay information document: "
            f"{_words(body.decode('utf-8', 'replace')) or 'empty body'}",
            url,
        )
    name = _words(doc.get("name") or "unnamed relay")
    raw = doc.get("version")
    shown = _words(raw) if isinstance(raw, str | int | float) and str(raw).strip() else None
    nips = doc.get("supported_nips")
    if isinstance(nips, list) and 1 not in nips:
        return EndpointCheck(
            NIP11, "failed", f"{NIP11}: {name} does not list NIP-01 in supported_nips {nips}", url, shown
        )
    if shown is None:
        return EndpointCheck(NIP11, "ok", f"{NIP11}: {name} answers; its document shows no version", url)
    if expected_short and not version_matches(shown, expected_short):
        return EndpointCheck(
            NIP11,
            "failed",
            f"{NIP11}: {name} reports version {shown}, expected {expected_short}: "
            "the relay answering there is not the new build",
            url,
            shown,
        )
    return EndpointCheck(NIP11, "ok", f"{NIP11}: {name} reports version {shown}", url, shown)


async def check_relay_req(url: str | None, *, session: aiohttp.ClientSession, limit: float) -> EndpointCheck:
    """NIP-01: `["REQ", sub, {"limit": 1}]` is answered by EOSE (stored EVENTs before it are fine), then CLOSE."""
    if not url:
        return EndpointCheck(REQ, "skipped", f"{REQ} skipped: no endpoints.relay_ws configured")
    sub = f"funnelcake-bot-{secrets.token_hex(4)}"
    events = 0
    opened = False
    # decided before the websocket's closing handshake, which must not turn an answer into a timeout
    verdict: EndpointCheck | None = None
    try:
        async with asyncio.timeout(limit):
            async with session.ws_connect(
                url, heartbeat=None, max_msg_size=_MAX_MESSAGE, timeout=aiohttp.ClientWSTimeout(ws_close=2.0)
            ) as ws:
                opened = True
                sent = time.perf_counter()
                await ws.send_str(json.dumps(["REQ", sub, {"limit": 1}]))
                while verdict is None:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.TEXT:
                        code = ws.close_code
                        why = f"code {code}" if code is not None else msg.type.name.lower()
                        verdict = EndpointCheck(
                            REQ, "failed", f"{REQ}: the relay closed the websocket ({why}) before EOSE", url
                        )
                        break
                    answer = _answer(msg.data, sub)
                    if answer == "event":
                        events += 1
                    elif answer == "eose":
                        latency = _ms(time.perf_counter() - sent)
                        before = f" after {events} stored event{'s' if events != 1 else ''}" if events else ""
                        verdict = EndpointCheck(
                            REQ, "ok", f"{REQ}: EOSE in {latency:g} ms{before}", url, latency_ms=latency
                        )
                        await ws.send_str(json.dumps(["CLOSE", sub]))
                    elif answer is not None:
                        verdict = EndpointCheck(REQ, "failed", f"{REQ}: {answer}", url)
    except aiohttp.WSServerHandshakeError as e:
        return EndpointCheck(
            REQ, "failed", f"{REQ}: {url} refused the websocket handshake (HTTP {e.status})", url
        )
    except TimeoutError:
        if verdict is not None:
            return verdict
        if not opened:
            return EndpointCheck(
                REQ, "failed", f"{REQ}: {url} did not open a websocket within {limit:g}s", url
            )
        got = f" ({events} event{'s' if events != 1 else ''} came first)" if events else ""
        return EndpointCheck(REQ, "failed", f"{REQ}: no EOSE from {url} within {limit:g}s{got}", url)
    except aiohttp.ClientError as e:
        if verdict is not None:  # the answer came; only the closing handshake failed
            return verdict
        return EndpointCheck(
            REQ, "failed", f"{REQ}: {url} could not be reached ({type(e).__name__}: {_words(e)})", url
        )
    return verdict or EndpointCheck(REQ, "failed", f"{REQ}: the relay answered nothing for {sub}", url)


def _answer(data: str, sub: str) -> str | None:
    """One relay message read for our subscription: "event", "eose", a refusal in the relay's words, or None."""
    try:
        msg = json.loads(data)
    except ValueError:
        return f"the relay sent something that is not JSON: {_words(data)}"
    if not isinstance(msg, list) or not msg:
        return f"the relay sent a message that is not a Nostr message: {_words(data)}"
    kind = msg[0]
    if kind == "NOTICE":
        return f"the relay answered NOTICE “{_words(msg[1] if len(msg) > 1 else '')}” instead of EOSE"
    if len(msg) < 2 or msg[1] != sub:
        return None  # another subscription's traffic, or an AUTH challenge a read can ignore
    if kind == "EVENT":
        return "event"
    if kind == "EOSE":
        return "eose"
    if kind == "CLOSED":
        return f"the relay closed the subscription: “{_words(msg[2] if len(msg) > 2 else '')}”"
    return None


async def check_api_health(url: str | None, *, session: aiohttp.ClientSession, limit: float) -> EndpointCheck:
    """The API's `/health` answers 2xx within the limit."""
    if not url:
        return EndpointCheck(HEALTH, "skipped", f"{HEALTH} skipped: no endpoints.api configured")
    health = url.rstrip("/") + "/health"
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit), session.get(health, allow_redirects=False) as resp:
            status = resp.status
            body = await resp.content.read(4096)
    except (TimeoutError, aiohttp.ClientError) as e:
        return EndpointCheck(HEALTH, "failed", f"{HEALTH}: {_unreachable(health, limit, e)}", health)
    latency = _ms(time.perf_counter() - started)
    if 200 <= status < 300:
        return EndpointCheck(
            HEALTH, "ok", f"{HEALTH}: {status} in {latency:g} ms", health, latency_ms=latency
        )
    text = _words(body.decode("utf-8", "replace"))
    return EndpointCheck(
        HEALTH, "failed", f"{HEALTH}: {health} answered {status}: {text or 'no body'}", health
    )


async def check_endpoints(
    endpoints: Endpoints,
    expected_short: str,
    *,
    session: aiohttp.ClientSession,
    relay_limit: float,
    api_limit: float,
) -> list[EndpointCheck]:
    """All three checks of one env, concurrently; `expected_short` empty means "report the version only"."""
    ws = str(endpoints.relay_ws) if endpoints.relay_ws else None
    api = str(endpoints.api) if endpoints.api else None
    return list(
        await asyncio.gather(
            check_relay_info(endpoints.relay_info_url, expected_short, session=session, limit=relay_limit),
            check_relay_req(ws, session=session, limit=relay_limit),
            check_api_health(api, session=session, limit=api_limit),
        )
    )


def summary_line(checks: list[EndpointCheck]) -> str:
    """One line for a thread or a status report: the relay's NIP-11 version and REQ→EOSE latency, the API's
    /health, each failure in full, and what was skipped because its endpoint is not configured."""
    if checks and all(c.status == "skipped" for c in checks):
        return "relay and API checks skipped: no endpoints configured for this environment"
    parts: list[str] = []
    skipped: list[str] = []
    for c in checks:
        if c.status == "skipped":
            skipped.append(c.check)
        elif c.status == "failed":
            parts.append(f"✗ {c.message}")
        elif c.check == NIP11:
            parts.append(f"{NIP11} version {c.version}" if c.version else f"{NIP11} shows no version")
        elif c.check == REQ:
            parts.append(f"{REQ} {c.latency_ms:g} ms")
        else:
            parts.append(c.message)
    if skipped:
        parts.append(f"skipped (no endpoint configured): {', '.join(skipped)}")
    return " · ".join(parts)
