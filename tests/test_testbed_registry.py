"""The local registries and synthetic images behave like the real thing through the distribution API."""

from __future__ import annotations

import asyncio
import hashlib
import json

import aiohttp
import pytest

from tests.testbed.registry import (
    ACCEPT,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    LocalRegistry,
    Registries,
    delete_tag,
    push_image,
)
from tests.testbed.tokenauth import ACCESS_TOKEN_USER, DEFAULT_PASSWORD, TokenServer


async def _manifest(s: aiohttp.ClientSession, base: str, repo: str, ref: str) -> tuple[int, str, bytes]:
    async with s.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


async def _config(s: aiohttp.ClientSession, base: str, repo: str, manifest: bytes) -> dict[str, object]:
    digest = json.loads(manifest)["config"]["digest"]
    async with s.get(f"{base}/v2/{repo}/blobs/{digest}") as r:
        assert r.status == 200
        return json.loads(await r.read())


async def test_arm64_image_reads_as_linux_arm64(registry: LocalRegistry) -> None:
    digest = await push_image(registry.url, "team/repo/funnelcake-api", "abc1234", "arm64")
    async with aiohttp.ClientSession() as s:
        status, ctype, body = await _manifest(s, registry.url, "team/repo/funnelcake-api", "abc1234")
        assert status == 200
        assert ctype == OCI_MANIFEST
        assert f"sha256:{hashlib.sha256(body).hexdigest()}" == digest
        cfg = await _config(s, registry.url, "team/repo/funnelcake-api", body)
    assert (cfg["os"], cfg["architecture"]) == ("linux", "arm64")


async def test_docker_format_single_manifest(registry: LocalRegistry) -> None:
    await push_image(registry.url, "r/img", "t1", "amd64", fmt="docker")
    async with aiohttp.ClientSession() as s:
        status, ctype, body = await _manifest(s, registry.url, "r/img", "t1")
        assert (status, ctype) == (200, DOCKER_MANIFEST)
        cfg = await _config(s, registry.url, "r/img", body)
    assert cfg["architecture"] == "amd64"


async def test_multi_arch_index_has_platforms_and_attestation(registry: LocalRegistry) -> None:
    digest = await push_image(registry.url, "r/img", "multi1", "multi")
    async with aiohttp.ClientSession() as s:
        status, ctype, body = await _manifest(s, registry.url, "r/img", "multi1")
        assert (status, ctype) == (200, OCI_INDEX)
        assert f"sha256:{hashlib.sha256(body).hexdigest()}" == digest
        entries = json.loads(body)["manifests"]
        platforms = [f"{e['platform']['os']}/{e['platform']['architecture']}" for e in entries]
        assert platforms == ["linux/amd64", "linux/arm64", "unknown/unknown"]
        att = entries[2]
        assert att["annotations"]["vnd.docker.reference.type"] == "attestation-manifest"
        assert att["annotations"]["vnd.docker.reference.digest"] == entries[0]["digest"]
        # every child is really in the registry, with a config matching its platform entry
        for e in entries[:2]:
            st, _, child = await _manifest(s, registry.url, "r/img", e["digest"])
            assert st == 200
            cfg = await _config(s, registry.url, "r/img", child)
            assert cfg["architecture"] == e["platform"]["architecture"]
        st, _, _ = await _manifest(s, registry.url, "r/img", att["digest"])
        assert st == 200


async def test_missing_tag_is_404_and_delete_tag_removes_it(registry: LocalRegistry) -> None:
    await push_image(registry.url, "r/img", "present", "amd64")
    async with aiohttp.ClientSession() as s:
        status, _, body = await _manifest(s, registry.url, "r/img", "nope")
        assert status == 404
        assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        await delete_tag(registry.url, "r/img", "present")
        status, _, _ = await _manifest(s, registry.url, "r/img", "present")
        assert status == 404


async def test_same_seed_same_digest_other_seed_differs(registry: LocalRegistry) -> None:
    a = await push_image(registry.url, "r/a", "t", "multi", seed=7)
    b = await push_image(registry.url, "r/b", "t", "multi", seed=7)
    c = await push_image(registry.url, "r/c", "t", "multi", seed=8)
    assert a == b != c


async def test_registries_have_real_shaped_prefixes_and_are_isolated(registries: Registries) -> None:
    assert registries.prefix("production").endswith("/dv-platform-prod/containers-production")
    assert registries.prefix("poc").endswith("/rich-compiler-479518-d2/containers-poc")
    assert len({registries[e].host for e in ("production", "staging", "poc")}) == 3
    await registries.push("staging", "funnelcake-api", "abc1234")
    async with aiohttp.ClientSession() as s:
        repo = registries.repository("staging", "funnelcake-api")
        assert (await _manifest(s, registries["staging"].url, repo, "abc1234"))[0] == 200
        assert (await _manifest(s, registries["poc"].url, repo, "abc1234"))[0] == 404


async def test_restart_keeps_storage_and_port() -> None:
    async with LocalRegistry("restart") as reg:
        digest = await push_image(reg.url, "r/img", "t", "amd64")
        host = reg.host
        await reg.kill()
        assert not reg.running
        await reg.start()
        assert reg.host == host
        async with aiohttp.ClientSession() as s:
            status, _, body = await _manifest(s, reg.url, "r/img", "t")
        assert status == 200
        assert f"sha256:{hashlib.sha256(body).hexdigest()}" == digest


async def test_large_layer_is_streamed(registry: LocalRegistry) -> None:
    # 8 MiB across several chunks: the registry serves back the whole layer under the digest we computed
    size = 8 * 1024 * 1024 + 17
    await asyncio.wait_for(push_image(registry.url, "r/big", "t", "amd64", layer_sizes=(size,)), 30)
    async with aiohttp.ClientSession() as s:
        status, _, body = await _manifest(s, registry.url, "r/big", "t")
        assert status == 200
        (layer,) = json.loads(body)["layers"]
        assert layer["size"] == size
        async with s.get(f"{registry.url}/v2/r/big/blobs/{layer['digest']}") as r:
            assert r.status == 200
            blob = await r.read()
    assert len(blob) == size
    assert f"sha256:{hashlib.sha256(blob).hexdigest()}" == layer["digest"]


async def test_token_registry_challenges_and_accepts_access_token(
    token_registry: LocalRegistry, token_server: TokenServer
) -> None:
    url = f"{token_registry.url}/v2/r/img/manifests/t"
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Accept": ACCEPT}) as r:
        assert r.status == 401
        challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith(f'Bearer realm="{token_server.realm}"')
    assert 'scope="repository:r/img:pull"' in challenge
    digest = await push_image(
        token_registry.url, "r/img", "t", "amd64", auth=(ACCESS_TOKEN_USER, DEFAULT_PASSWORD)
    )
    assert digest.startswith("sha256:")
    assert {r["user"] for r in token_server.requests} == {ACCESS_TOKEN_USER}


async def test_token_registry_refuses_wrong_password(token_registry: LocalRegistry) -> None:
    with pytest.raises(aiohttp.ClientResponseError) as e:
        await push_image(token_registry.url, "r/img", "t", "amd64", auth=(ACCESS_TOKEN_USER, "wrong"))
    assert e.value.status == 401
