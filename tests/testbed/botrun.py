"""The real bot app (service + Slack front + HTTP listener) running against the sandbox and the local Slack.

Requests reach it the way Slack sends them: signed HTTP POSTs to /slack/events, or Socket Mode envelopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot.service import DeployService
from bot.wiring import build_service
from handlers.app import SlackFront
from handlers.http import EdgeRunner, web_app
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import SIGNING_SECRET, FakeSlack, signed_headers

__all__ = ["RunningBot", "bot", "slack_sandbox"]


class RunningBot:
    def __init__(self, sandbox: Sandbox, slack: FakeSlack, *, reporter_interval: float = 0.05) -> None:
        self.sandbox = sandbox
        self.slack = slack
        self.reporter_interval = reporter_interval
        self._stack = contextlib.AsyncExitStack()
        self.service: DeployService | None = None
        self.front: SlackFront | None = None
        self.url = ""
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        assert self.sandbox.config is not None
        try:
            session = await self._stack.enter_async_context(aiohttp.ClientSession())
            self.http = session
            client = AsyncWebClient(
                token=self.slack.bot_token,
                base_url=self.slack.api_url,
                session=session,
                retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=10)],
            )
            self.service = await self._stack.enter_async_context(
                build_service(self.sandbox.settings(), self.sandbox.config)
            )
            self.front = SlackFront(
                self.service,
                client,
                signing_secret=self.slack.signing_secret,
                reporter_interval=self.reporter_interval,
            )
            self._stack.push_async_callback(self.front.shutdown)

            async def ready() -> list[str]:
                return []

            runner = EdgeRunner(web_app(self.front, readiness=ready, slack_events=True))
            await runner.setup()
            self._stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self._stack.aclose()

    # ---- driving it like Slack does

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        assert self.http is not None
        async with self.http.post(f"{self.url}/slack/events", data=body, headers=headers) as resp:
            return resp.status, await resp.text()

    async def command(self, text: str, *, user: str = "U0ALICE", channel: str = "C0DEPLOYS") -> str:
        """A signed /funnelcake command over HTTP; returns the ack text (what the user sees at once)."""
        payload = self.slack.slash_payload(text, user_id=user, channel_id=channel)
        body = urlencode(payload).encode()
        status, text_out = await self.post(body, signed_headers(body, SIGNING_SECRET))
        assert status == 200, (status, text_out)
        return text_out

    async def click(self, ts: str, action_id: str, *, user: str, channel: str = "C0DEPLOYS") -> None:
        payload = self.slack.action_payload(channel, ts, action_id, user_id=user)
        body = urlencode({"payload": json.dumps(payload)}).encode()
        status, text = await self.post(body, signed_headers(body, SIGNING_SECRET))
        assert status == 200, (status, text)

    async def settle(self, timeout: float = 90.0) -> None:  # noqa: ASYNC109 - test-facing deadline
        """Wait until every command, deploy and Slack write the bot started has finished."""
        assert self.front is not None
        assert self.service is not None
        async with asyncio.timeout(timeout):
            while True:
                pending: list[asyncio.Task[Any]] = [*self.front.tasks, *self.service._tasks.values()]
                if pending:
                    await asyncio.wait(pending)
                    continue
                await self.front.flush()
                if not self.front.tasks and not self.service._tasks:
                    return


@pytest.fixture
async def slack_sandbox() -> AsyncIterator[FakeSlack]:
    slack = FakeSlack(post_interval=0.05, post_burst=5)
    await slack.start()
    try:
        yield slack
    finally:
        await slack.stop()


@pytest.fixture
async def bot(sandbox: Sandbox, slack_sandbox: FakeSlack) -> AsyncIterator[RunningBot]:
    running = RunningBot(sandbox, slack_sandbox)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()
