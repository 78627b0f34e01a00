"""Promotion between real registries: digest kept, all platforms, idempotent, resumable after a crash."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from bot.adapters.registry import PromoteProgress, RegistryClient
from bot.errors import PermanentError, TransientError
from tests.testbed.registry import ACCEPT, LocalRegistry, Registries, push_image

_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-authorization",
    "content-length",
}


def _client() -> RegistryClient:
    return RegistryClient(attempts=2, wait_initial=0.01, wait_max=0.05)


class RecordingProxy:
    """A reverse proxy in front of a registry that records what the client sends.

    `strip_mount` drops the cross-repository mount parameters, so the registry answers 202 (start an
    upload) the way a registry does when it cannot or will not mount.
    """

    def __init__(self, upstream: str, *, strip_mount: bool = False) -> None:
        self.upstream = upstream
        self.strip_mount = strip_mount
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.host = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        url = URL(request.raw_path, encoded=True)
        if self.strip_mount and "mount" in url.query:
            url = url.without_query_params("mount", "from")
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "content_length": request.headers.get("Content-Length"),
                "chunked": "chunked" in request.headers.get("Transfer-Encoding", "").lower(),
            }
        )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        if request.headers.get("Content-Length"):
            headers["Content-Length"] = request.headers["Content-Length"]
        data = request.content.iter_chunked(1 << 16) if request.body_exists else None
        async with self._session.request(
            request.method,
            URL(self.upstream).join(url),
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as r:
            body = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP}
        return web.Response(status=r.status, body=body if request.method != "HEAD" else None, headers=out)

    async def __aenter__(self) -> RecordingProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=60))
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.host = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None and self._session is not None
        await self._runner.cleanup()
        await self._session.close()


async def _children(url: str, repo: str, tag: str) -> list[str]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT}) as r:
            assert r.status == 200
            index = await r.json(content_type=None)
        digests = [m["digest"] for m in index["manifests"]]
        for d in digests:
            async with s.head(f"{url}/v2/{repo}/manifests/{d}", headers={"Accept": ACCEPT}) as r:
                assert r.status == 200, d
        return digests


async def test_promote_multi_arch_keeps_digest_platforms_and_attestation(registries: Registries) -> None:
    digest = await registries.push(
        "staging", "funnelcake-api", "abc1234", "multi", layer_sizes=(300_000, 5000)
    )
    src, dst = registries.prefix("staging"), registries.prefix("production")
    seen: list[PromoteProgress] = []
    async with _client() as rc:
        assert (await rc.check(dst, "funnelcake-api", "abc1234")).state == "missing"
        result = await rc.promote(src, dst, "funnelcake-api", "abc1234", progress=seen.append)
        after = await rc.check(dst, "funnelcake-api", "abc1234")
    assert result.digest == digest
    assert not result.noop
    # 2 platforms x (config + 2 layers) + attestation (config + statement)
    assert (result.blobs_copied, result.blobs_skipped) == (8, 0)
    assert result.bytes_copied > 2 * 305_000
    assert (after.state, after.digest, after.platforms) == ("ok", digest, ("linux/amd64", "linux/arm64"))
    assert seen[-1].blobs_done == seen[-1].blobs_total == 8
    repo = registries.repository("production", "funnelcake-api")
    assert len(await _children(registries["production"].url, repo, "abc1234")) == 3


async def test_repromote_is_a_fast_noop(registries: Registries) -> None:
    await registries.push("staging", "funnelcake-relay", "abc1234", "amd64")
    src, dst = registries.prefix("staging"), registries.prefix("poc")
    async with _client() as rc:
        first = await rc.promote(src, dst, "funnelcake-relay", "abc1234")
        again = await rc.promote(src, dst, "funnelcake-relay", "abc1234")
    assert not first.noop
    assert again.noop
    assert again.digest == first.digest
    assert (again.blobs_copied, again.bytes_copied) == (0, 0)


async def test_promote_of_missing_source_tag_is_permanent(registries: Registries) -> None:
    async with _client() as rc:
        with pytest.raises(PermanentError, match="not in the source registry"):
            await rc.promote(
                registries.prefix("staging"), registries.prefix("poc"), "funnelcake-api", "fff0000"
            )


async def test_same_host_mounts_instead_of_copying(registry: LocalRegistry) -> None:
    digest = await push_image(registry.url, "a/src/img", "t", "multi")
    async with _client() as rc:
        result = await rc.promote(f"{registry.host}/a/src", f"{registry.host}/b/dst", "img", "t")
        assert (await rc.check(f"{registry.host}/b/dst", "img", "t")).digest == digest
    assert result.blobs_copied == 8
    assert result.bytes_copied == 0


async def test_refused_mount_falls_back_to_a_monolithic_upload(registry: LocalRegistry) -> None:
    digest = await push_image(registry.url, "a/src/img", "t", "amd64", layer_sizes=(3 * 1024 * 1024 + 5, 10))
    async with RecordingProxy(registry.url, strip_mount=True) as proxy, _client() as rc:
        result = await rc.promote(f"{proxy.host}/a/src", f"{proxy.host}/b/dst", "img", "t")
        assert (await rc.check(f"{registry.host}/b/dst", "img", "t")).digest == digest
    assert result.bytes_copied > 3 * 1024 * 1024 + 15  # both layers and the config were streamed
    posts = [r for r in proxy.requests if r["method"] == "POST"]
    assert posts and all(r["query"].get("mount") for r in posts)  # it asked to mount first
    puts = [r for r in proxy.requests if r["method"] == "PUT" and "/blobs/uploads/" in r["path"]]
    assert len(puts) == 3  # config + 2 layers, each ONE request
    for put in puts:
        assert not put["chunked"]
        assert put["content_length"] is not None and int(put["content_length"]) > 0
        assert put["query"]["_state"]  # the registry's signed state survived next to digest=
        assert put["query"]["digest"].startswith("sha256:")
    assert not [r for r in proxy.requests if r["method"] == "PATCH"]


async def test_source_dying_mid_copy_fails_clearly_then_resumes() -> None:
    async with LocalRegistry("src") as src, LocalRegistry("dst") as dst:
        mib = 1024 * 1024
        digest = await push_image(src.url, "p/img", "t", "amd64", layer_sizes=(16 * mib, 16 * mib, 16 * mib))
        killed = asyncio.Event()

        def on_progress(p: PromoteProgress) -> None:
            # config and the first layer are across: take the source away while the next layer streams
            if p.blobs_done == 2 and not killed.is_set():
                killed.set()

        async def killer() -> None:
            await killed.wait()
            await src.kill()

        kill_task = asyncio.create_task(killer(), name="kill-source-registry")
        try:
            async with _client() as rc:
                with pytest.raises(TransientError) as e:
                    await rc.promote(
                        f"{src.host}/p", f"{dst.host}/q", "img", "t", concurrency=1, progress=on_progress
                    )
        finally:
            await kill_task
        assert f"registry {src.host} unavailable" in str(e.value)
        async with _client() as rc:
            assert (await rc.check(f"{dst.host}/q", "img", "t")).state == "missing"  # the tag comes last

        await src.start()  # same storage, same port
        async with _client() as rc:
            result = await rc.promote(f"{src.host}/p", f"{dst.host}/q", "img", "t", concurrency=1)
            assert (await rc.check(f"{dst.host}/q", "img", "t")).digest == digest
        assert result.digest == digest
        assert result.blobs_skipped >= 2
        assert result.blobs_copied + result.blobs_skipped == 4
