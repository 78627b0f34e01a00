"""The relay and API checks on their own, against the real relay (`nostr-relay`) through a cuttable TCP proxy.

The end-to-end tests (tests/test_relay_e2e.py) cover what a deploy and `status` say; these cover what
the checks say when the path to a relay goes dead or the relay is gone: a timeout or a refused connection
is a failure with the check's name, never an exception and never a hang past the limit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.adapters.endpoints import check_endpoints, check_relay_info, check_relay_req, summary_line
from bot.settings import Endpoints
from tests.testbed.relay import NostrRelay
from tests.testbed.tcpproxy import TcpProxy


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[NostrRelay]:
    r = NostrRelay(tmp_path, "poc", "e7e79eb")
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_through_a_healthy_path_both_relay_checks_pass(
    relay: NostrRelay, http: aiohttp.ClientSession
) -> None:
    async with TcpProxy(("127.0.0.1", relay.port)) as proxy:
        ws = f"ws://{proxy.address}/"
        checks = await check_endpoints(
            Endpoints.model_validate({"relay_ws": ws}), "e7e79eb", session=http, relay_limit=5, api_limit=5
        )
    assert [(c.check, c.status) for c in checks] == [
        ("relay NIP-11", "ok"),
        ("relay REQ→EOSE", "ok"),
        ("api /health", "skipped"),
    ]
    # NIP-11 is read from the websocket's URL over http, as the relay serves both on one port
    assert checks[0].url == f"http://{proxy.address}/"
    assert summary_line(checks).startswith("relay NIP-11 version e7e79eb · relay REQ→EOSE ")
    assert summary_line(checks).endswith("skipped (no endpoint configured): api /health")


async def test_a_dead_path_fails_both_checks_within_their_limit(
    relay: NostrRelay, http: aiohttp.ClientSession
) -> None:
    async with TcpProxy(("127.0.0.1", relay.port)) as proxy:
        proxy.cut()  # connections are accepted, then nothing comes back
        info = await check_relay_info(f"http://{proxy.address}/", "e7e79eb", session=http, limit=0.5)
        req = await check_relay_req(f"ws://{proxy.address}/", session=http, limit=0.5)
    assert info.status == "failed"
    assert info.message == f"relay NIP-11: http://{proxy.address}/ did not answer within 0.5s"
    assert req.status == "failed"
    assert req.message == f"relay REQ→EOSE: ws://{proxy.address}/ did not open a websocket within 0.5s"


async def test_a_relay_that_is_gone_fails_with_what_the_connection_said(
    relay: NostrRelay, http: aiohttp.ClientSession
) -> None:
    await relay.stop()
    req = await check_relay_req(relay.ws_url, session=http, limit=2)
    assert req.status == "failed"
    assert req.message.startswith(
        f"relay REQ→EOSE: {relay.ws_url} could not be reached (ClientConnectorError"
    )
    info = await check_relay_info(relay.http_url, "e7e79eb", session=http, limit=2)
    assert info.status == "failed"
    assert info.message.startswith(
        f"relay NIP-11: {relay.http_url} could not be reached (ClientConnectorError"
    )
