"""The bot's HTTP listener: Slack's /slack/events (HTTP mode) plus the probes, translated at the edge only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request

from handlers.app import SlackFront

Readiness = Callable[[], Awaitable[list[str]]]  # the problems that make the bot not ready; empty = ready


def web_app(front: SlackFront | None, *, readiness: Readiness, slack_events: bool) -> web.Application:
    app = web.Application()

    async def events(request: web.Request) -> web.Response:
        assert front is not None  # noqa: S101 - the route exists only with a front
        bolt_request = await to_bolt_request(request)
        bolt_response = await front.app.async_dispatch(bolt_request)
        return await to_aiohttp_response(bolt_response)

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
