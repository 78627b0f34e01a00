"""The bot's HTTP listener: Slack's /slack/events (HTTP mode) plus the probes, translated at the edge only.

The edge holds before anything reaches Bolt: the body is read under a deadline, the signature and
timestamp are checked on the raw bytes before anything is decoded, and only then is the body decoded and
its shape checked. A bad signature is a 401, a signed but malformed body a 400, each with one log line
and no traceback. Slack re-delivers a request it thinks was lost (same body, same signature): within
Slack's five-minute window a duplicate gets the first answer again and acts nothing twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.request.async_request import AsyncBoltRequest

from handlers.app import SlackFront

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[list[str]]]  # the problems that make the bot not ready; empty = ready

SIGNATURE_WINDOW = 300  # seconds: Slack's replay window for X-Slack-Request-Timestamp
BODY_TIMEOUT = 10.0  # seconds to receive the whole body: a trickling client is cut off
MAX_BODY = 256 * 1024  # Slack's payloads are a few KiB; a button-heavy message stays far below this
HEADER_TIMEOUT = 10.0  # seconds to a complete request head, from connecting or from the last response
_SEEN_MAX = 2048


class Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


def verify(secret: str, body: bytes, timestamp: str | None, signature: str | None, now: float) -> None:
    """Slack's v0 signature over the raw bytes; Refused(401) with the reason when it does not hold."""
    if not timestamp or not signature:
        raise Refused(401, "no signature headers")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise Refused(401, "the timestamp is not a number")
    if abs(now - int(timestamp)) > SIGNATURE_WINDOW:
        raise Refused(401, "the timestamp is outside the five-minute window")
    base = b"v0:" + timestamp.encode() + b":" + body
    expected = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise Refused(401, "the signature does not match")


def decode(content_type: str, charset: str | None, body: bytes) -> str:
    """The body as text, once its shape is one Slack sends; Refused(400) otherwise."""
    if charset is not None and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise Refused(400, f"unsupported charset {charset[:40]!r}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "the body is not UTF-8") from None
    if content_type == "application/json":
        doc = _json_object(text, "the JSON body")
        if doc.get("type") == "event_callback":
            _event_shape(doc)  # the Events API: app_home_opened
        elif doc.get("type") != "url_verification":
            raise Refused(400, "a JSON body other than an Events API event or Slack's url_verification")
    elif content_type == "application/x-www-form-urlencoded":
        try:
            form = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), errors="strict")
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "the form body is malformed") from None
        if "payload" in form:
            payload = _json_object(form["payload"][0], "payload=")
            if payload.get("type") != "block_actions":
                raise Refused(400, "payload= is not a button click (block_actions)")
            _click_shape(payload)
        elif not form.get("command") and not form.get("ssl_check"):
            raise Refused(400, "the form is neither a slash command nor an interaction")
    else:
        raise Refused(400, f"unsupported content type {content_type[:60]!r}")
    return text


SUBSCRIBED_EVENTS = frozenset({"app_home_opened"})  # manifest.yml's bot_events: all Slack sends us


def _event_shape(doc: dict[str, object]) -> None:
    """An event the app subscribes to, with what Bolt reads of it before any listener runs (a user id)."""
    event = doc.get("event")
    if not isinstance(event, dict) or event.get("type") not in SUBSCRIBED_EVENTS:
        raise Refused(400, "the event_callback carries no event this app subscribes to")
    if not isinstance(event.get("user"), str):
        raise Refused(400, "the event names no user")


def _click_shape(payload: dict[str, object]) -> None:
    """What Bolt reads of a click before any listener runs: a user with an id and a first action."""
    actions, user = payload.get("actions"), payload.get("user")
    if not isinstance(user, dict) or not isinstance(user.get("id"), str):
        raise Refused(400, "the click names no user")
    if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict):
        raise Refused(400, "the click carries no action")
    if not isinstance(actions[0].get("action_id"), str):
        raise Refused(400, "the click's action has no action_id")


def _json_object(text: str, what: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        raise Refused(400, f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise Refused(400, f"{what} is not a JSON object")
    return value


class Replays:
    """The answers to signed requests seen within the window, by signature: a re-delivery acts once."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, tuple[float, asyncio.Future[web.Response]]] = OrderedDict()

    def first(self, signature: str, now: float) -> asyncio.Future[web.Response] | None:
        """None for a new request (it is registered); the first delivery's answer for a duplicate."""
        while self._seen and (
            len(self._seen) > _SEEN_MAX or now - next(iter(self._seen.values()))[0] > SIGNATURE_WINDOW
        ):
            self._seen.popitem(last=False)
        hit = self._seen.get(signature)
        if hit is not None:
            return hit[1]
        self._seen[signature] = (now, asyncio.get_running_loop().create_future())
        return None

    def answer(self, signature: str, response: web.Response) -> None:
        hit = self._seen.get(signature)
        if hit is not None and not hit[1].done():
            hit[1].set_result(response)


class EdgeRunner(web.AppRunner):
    """The listener's runner. aiohttp closes a connection that is idle or still without a whole request
    head when its keep-alive timer runs out (armed at connect and after each response); the default, an
    hour, let trickling clients hold sockets open, so it is the header deadline here."""

    def __init__(self, app: web.Application, *, header_timeout: float = HEADER_TIMEOUT) -> None:
        # Slack's requests are acked within 3 s: a stop need not wait a minute for a stuck one.
        super().__init__(app, access_log=None, keepalive_timeout=header_timeout, shutdown_timeout=5.0)


def web_app(front: SlackFront | None, *, readiness: Readiness, slack_events: bool) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    replays = Replays()

    async def events(request: web.Request) -> web.Response:
        assert front is not None  # noqa: S101 - the route exists only with a front
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await request.read()
        except TimeoutError:
            log.warning(
                "refused a request to /slack/events: the body did not arrive within %.0f s", BODY_TIMEOUT
            )
            return web.Response(status=408, text="request body too slow", headers={"Connection": "close"})
        except web.HTTPRequestEntityTooLarge:
            log.warning("refused a request to /slack/events: the body is over %d bytes", MAX_BODY)
            return web.Response(status=413, text="request body too large", headers={"Connection": "close"})
        signature = request.headers.get("X-Slack-Signature")
        try:
            if front.signing_secret is not None:
                verify(
                    front.signing_secret,
                    body,
                    request.headers.get("X-Slack-Request-Timestamp"),
                    signature,
                    time.time(),
                )
            text = decode(request.content_type, request.charset, body)
        except Refused as e:
            log.warning("refused a request to /slack/events (%d): %s", e.status, e.why)
            return web.Response(
                status=e.status, text="invalid request" if e.status == 400 else "unauthorized"
            )
        earlier = replays.first(signature, time.monotonic()) if signature else None
        if earlier is not None:
            log.info("a re-delivered Slack request got the first delivery's answer")
            first = await asyncio.shield(earlier)
            return web.Response(status=first.status, body=first.body, content_type=first.content_type)
        bolt_request = AsyncBoltRequest(
            body=text,
            query=request.query_string,
            headers={k.lower(): list(request.headers.getall(k)) for k in request.headers},
        )
        try:
            response = await to_aiohttp_response(await front.app.async_dispatch(bolt_request))
        except BaseException:
            if signature:
                replays.answer(signature, web.Response(status=500))
            raise
        if signature:
            replays.answer(signature, response)
        return response

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        problems = await readiness()
        if problems:
            return web.json_response({"status": "not ready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    if slack_events and front is not None:
        app.router.add_post("/slack/events", events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
