"""Site check against a local aiohttp server: 2xx in time, version shown must match, skipped when unset."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bot.adapters.site import check_site, find_version
from bot.errors import TransientError


class Site:
    def __init__(self) -> None:
        self.body = "<html><body>funnelcake relay</body></html>"
        self.status = 200
        self.delay = 0.0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, _req: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
        return web.Response(text=self.body, status=self.status, content_type="text/html")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    s = Site()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_unset_url_is_skipped(session: aiohttp.ClientSession) -> None:
    res = await check_site(None, "e7e79eb", session=session)
    assert res.status == "skipped"
    assert "skipped" in res.message


async def test_matching_version_is_ok(site: Site, session: aiohttp.ClientSession) -> None:
    site.body = "<html><footer>funnelcake version <code>e7e79eb</code></footer></html>"
    res = await check_site(site.url, "e7e79eb", session=session)
    assert (res.status, res.http_status, res.version) == ("ok", 200, "e7e79eb")


async def test_other_version_fails(site: Site, session: aiohttp.ClientSession) -> None:
    site.body = "<html><footer>Version: 1a2b3c4</footer></html>"
    res = await check_site(site.url, "e7e79eb", session=session)
    assert res.status == "failed"
    assert res.version == "1a2b3c4"
    assert "expected e7e79eb" in res.message


async def test_no_version_on_page_is_ok_and_says_so(site: Site, session: aiohttp.ClientSession) -> None:
    res = await check_site(site.url, "e7e79eb", session=session)
    assert res.status == "ok"
    assert "no version" in res.message


async def test_4xx_fails(site: Site, session: aiohttp.ClientSession) -> None:
    site.status = 404
    res = await check_site(site.url, "e7e79eb", session=session)
    assert (res.status, res.http_status) == ("failed", 404)


async def test_5xx_is_transient(site: Site, session: aiohttp.ClientSession) -> None:
    site.status = 503
    with pytest.raises(TransientError, match="503"):
        await check_site(site.url, "e7e79eb", session=session)


async def test_slow_site_times_out(site: Site, session: aiohttp.ClientSession) -> None:
    site.delay = 0.6
    with pytest.raises(TransientError, match="did not answer within"):
        await check_site(site.url, "e7e79eb", session=session, limit=0.2)


async def test_unreachable_is_transient(session: aiohttp.ClientSession) -> None:
    s = Site()
    await s.start()
    url = s.url
    await s.stop()
    with pytest.raises(TransientError):
        await check_site(url, "e7e79eb", session=session, limit=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("relay version e7e79eb", "e7e79eb"),
        ('{"version": "v0.4.1", "commit": "e7e79eb"}', "0.4.1"),
        ("Build: 1a2b3c4d", "1a2b3c4d"),
        ("<p>welcome to the relay</p>", None),
        ("see version history", None),
    ],
)
def test_find_version(text: str, expected: str | None) -> None:
    assert find_version(text) == expected
