"""The registry client against real docker-registry processes, a token-auth registry and failing fakes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from google.oauth2.credentials import Credentials as GoogleUserCredentials

from bot.adapters.registry import (
    Anonymous,
    BasicCredentials,
    GoogleAccessToken,
    RegistryClient,
    is_artifact_registry,
    retry_after,
)
from bot.errors import PermanentError, TransientError
from bot.pipeline.engine import Pipeline, Step, StepOutcome, StepProgress
from bot.pipeline.steps.images import REGISTRY_RETRY
from tests.testbed.registry import LocalRegistry, Registries, push_image
from tests.testbed.tokenauth import ACCESS_TOKEN_USER, DEFAULT_PASSWORD, TokenServer

PREFIX_PATH = "dv-platform-staging/containers-staging"


def _fast(**kw: object) -> RegistryClient:
    return RegistryClient(attempts=3, wait_initial=0.01, wait_max=0.05, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def client() -> AsyncIterator[RegistryClient]:
    async with _fast() as rc:
        yield rc


@pytest.mark.parametrize("fmt", ["oci", "docker"])
async def test_each_answer_for_each_image_kind(
    registry: LocalRegistry, client: RegistryClient, fmt: str
) -> None:
    prefix = f"{registry.host}/{PREFIX_PATH}"
    repo = f"{PREFIX_PATH}/funnelcake-api"
    amd = await push_image(registry.url, repo, "amd1234", "amd64", fmt=fmt)  # type: ignore[arg-type]
    arm = await push_image(registry.url, repo, "arm1234", "arm64", fmt=fmt)  # type: ignore[arg-type]
    multi = await push_image(registry.url, repo, "mul1234", "multi", fmt=fmt)  # type: ignore[arg-type]

    missing = await client.check(prefix, "funnelcake-api", "nope123")
    assert (missing.state, missing.digest, missing.platforms) == ("missing", None, ())
    assert missing.reference == f"{prefix}/funnelcake-api:nope123"

    ok = await client.check(prefix, "funnelcake-api", "amd1234")
    assert (ok.state, ok.digest, ok.platforms) == ("ok", amd, ("linux/amd64",))

    wrong = await client.check(prefix, "funnelcake-api", "arm1234")
    assert (wrong.state, wrong.digest, wrong.platforms) == ("wrong_platform", arm, ("linux/arm64",))

    idx = await client.check(prefix, "funnelcake-api", "mul1234")
    # the attestation entry (unknown/unknown) is not a platform
    assert (idx.state, idx.digest, idx.platforms) == ("ok", multi, ("linux/amd64", "linux/arm64"))

    assert (await client.check(prefix, "funnelcake-api", "arm1234", platform="linux/arm64")).ok
    assert (
        await client.check(prefix, "funnelcake-api", "amd1234", platform="linux/arm64")
    ).state == "wrong_platform"


async def test_other_images_and_registries_are_separate(
    registries: Registries, client: RegistryClient
) -> None:
    await registries.push("poc", "funnelcake-relay", "abc1234")
    assert (await client.check(registries.prefix("poc"), "funnelcake-relay", "abc1234")).ok
    assert (await client.check(registries.prefix("poc"), "funnelcake-api", "abc1234")).state == "missing"
    assert (
        await client.check(registries.prefix("staging"), "funnelcake-relay", "abc1234")
    ).state == "missing"


async def test_token_auth_through_challenge(token_registry: LocalRegistry, token_server: TokenServer) -> None:
    creds = BasicCredentials(ACCESS_TOKEN_USER, DEFAULT_PASSWORD)
    digest = await push_image(
        token_registry.url, "p/r/img", "t", "multi", auth=(ACCESS_TOKEN_USER, DEFAULT_PASSWORD)
    )
    async with _fast(credentials=lambda host: creds) as rc:
        status = await rc.check(f"{token_registry.host}/p/r", "img", "t")
    assert (status.state, status.digest) == ("ok", digest)
    assert token_server.requests[-1]["user"] == ACCESS_TOKEN_USER


async def test_concurrent_first_checks_fetch_one_token(
    token_registry: LocalRegistry, token_server: TokenServer
) -> None:
    await push_image(token_registry.url, "p/r/img", "t", "amd64", auth=(ACCESS_TOKEN_USER, DEFAULT_PASSWORD))
    before = token_server.token_requests
    creds = BasicCredentials(ACCESS_TOKEN_USER, DEFAULT_PASSWORD)
    async with _fast(credentials=lambda host: creds) as rc:
        results = await asyncio.gather(
            *(rc.check(f"{token_registry.host}/p/r", "img", "t") for _ in range(12))
        )
        assert all(r.ok for r in results)
        assert token_server.token_requests - before == 1
        # a later check of the same repository reuses the cached token
        assert (await rc.check(f"{token_registry.host}/p/r", "img", "t")).ok
        assert token_server.token_requests - before == 1


async def test_google_access_token_as_bearer_then_via_challenge(
    token_registry: LocalRegistry, token_server: TokenServer
) -> None:
    await push_image(token_registry.url, "p/r/img", "t", "amd64", auth=(ACCESS_TOKEN_USER, DEFAULT_PASSWORD))
    google = GoogleAccessToken(GoogleUserCredentials(token=DEFAULT_PASSWORD))
    assert google.identity == "oauth2accesstoken (google: application default credentials)"
    async with _fast(credentials=lambda host: google) as rc:
        assert (await rc.check(f"{token_registry.host}/p/r", "img", "t")).ok
    # docker-registry does not take the raw access token: the client fell back to the token realm
    assert token_server.requests[-1]["user"] == ACCESS_TOKEN_USER


async def test_wrong_password_names_host_repository_and_identity(token_registry: LocalRegistry) -> None:
    creds = BasicCredentials(ACCESS_TOKEN_USER, "not-the-token")
    async with _fast(credentials=lambda host: creds) as rc:
        with pytest.raises(PermanentError) as e:
            await rc.check(f"{token_registry.host}/p/r", "img", "t")
    msg = str(e.value)
    assert token_registry.host in msg
    assert "p/r/img" in msg
    assert "basic user oauth2accesstoken" in msg
    assert "not-the-token" not in msg


async def test_push_denied_names_identity(token_registry: LocalRegistry, registry: LocalRegistry) -> None:
    # anonymous users get pull-only tokens: promoting into the token registry must be denied, clearly
    await push_image(registry.url, "src/img", "t", "amd64")
    async with _fast(credentials=lambda host: Anonymous()) as rc:
        with pytest.raises(PermanentError) as e:
            await rc.promote(f"{registry.host}/src", f"{token_registry.host}/p/r", "img", "t")
    msg = str(e.value)
    assert f"registry {token_registry.host} denied push on repository p/r/img for anonymous" in msg


class _Flaky:
    """A fake registry that fails the first `failures` requests (503, or a hang), then answers 404."""

    def __init__(self, failures: int, mode: str = "503") -> None:
        self.failures = failures
        self.mode = mode
        self.hits = 0
        self.runner: web.AppRunner | None = None
        self.host = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.hits <= self.failures:
            if self.mode == "hang":
                await asyncio.sleep(1)
            if self.mode == "429":
                return web.json_response(
                    {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]},
                    status=429,
                    headers={"Retry-After": "2"},
                )
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "try later"}]}, status=503
            )
        return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "unknown"}]}, status=404)

    async def __aenter__(self) -> _Flaky:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.host = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_5xx_is_retried_then_succeeds() -> None:
    async with _Flaky(failures=2) as fake, _fast() as rc:
        status = await rc.check(f"{fake.host}/p/r", "img", "t")
    assert status.state == "missing"
    assert fake.hits == 3


async def test_5xx_exhausts_retries_into_transient_error() -> None:
    async with _Flaky(failures=100) as fake, _fast() as rc:
        with pytest.raises(TransientError) as e:
            await rc.check(f"{fake.host}/p/r", "img", "t")
    assert fake.hits == 3
    assert str(e.value).startswith(f"registry {fake.host} unavailable:")
    assert "503" in str(e.value)


class _CheckStep(Step[RegistryClient]):
    """A step that checks one image, retrying as the steps that call the registry do."""

    name = "preflight"
    timeout = 10.0
    retry = REGISTRY_RETRY

    def __init__(self, host: str) -> None:
        self.host = host

    async def run(self, ctx: RegistryClient, progress: StepProgress) -> Mapping[str, Any]:
        return {"state": (await ctx.check(f"{self.host}/p/r", "img", "t")).state}


async def test_a_registry_step_does_not_multiply_the_clients_retries() -> None:
    async with _Flaky(failures=100) as fake, _fast() as rc:
        result = await Pipeline("d-1", [_CheckStep(fake.host)], []).run(rc)
    assert fake.hits == 3  # the client's 3 attempts, once: not 3 for each of the step's attempts
    failed = result.failed
    assert failed is not None and failed.outcome is StepOutcome.ERRORED
    assert failed.message.startswith(f"registry {fake.host} unavailable:")
    assert failed.hint is not None and failed.hint.startswith("Gave up after 3 attempts")


async def test_a_registry_step_rides_out_a_blip_through_the_client() -> None:
    async with _Flaky(failures=2) as fake, _fast() as rc:
        result = await Pipeline("d-2", [_CheckStep(fake.host)], []).run(rc)
    assert result.ok and result.results[0].data == {"state": "missing"}
    assert fake.hits == 3 and result.results[0].attempts == 1


async def test_429_waits_as_long_as_retry_after_says() -> None:
    loop = asyncio.get_running_loop()
    async with _Flaky(failures=1, mode="429") as fake, _fast() as rc:
        started = loop.time()
        status = await rc.check(f"{fake.host}/p/r", "img", "t")
        waited = loop.time() - started
    assert status.state == "missing" and fake.hits == 2
    # the registry asked for 2 s; the client's own backoff here is at most 0.05 s
    assert 1.9 <= waited < 5, waited


async def test_a_429_that_outlasts_the_retries_tells_the_step_how_long_to_wait() -> None:
    async with _Flaky(failures=100, mode="429") as fake:
        rc = RegistryClient(attempts=1)
        try:
            with pytest.raises(TransientError) as e:
                await rc.check(f"{fake.host}/p/r", "img", "t")
        finally:
            await rc.close()
    assert e.value.delay == 2
    assert "429" in str(e.value)


def test_retry_after_reads_seconds_and_dates_and_is_capped() -> None:
    soon = datetime.now(UTC) + timedelta(seconds=30)
    assert retry_after("2", cap=60) == 2
    assert 25 < (retry_after(format_datetime(soon, usegmt=True), cap=60) or 0) <= 30
    assert retry_after("3600", cap=60) == 60
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", cap=60) == 0  # a date gone by: at once
    assert retry_after("soon", cap=60) is None
    assert retry_after(None, cap=60) is None


async def test_timeout_is_retried_then_reported() -> None:
    async with _Flaky(failures=100, mode="hang") as fake:
        rc = RegistryClient(timeout=0.2, attempts=2, wait_initial=0.01, wait_max=0.02)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(TransientError) as e:
                await rc.check(f"{fake.host}/p/r", "img", "t")
            assert loop.time() - started < 2
        finally:
            await rc.close()
    assert fake.hits == 2
    assert f"registry {fake.host} unavailable" in str(e.value)


def test_scheme_and_artifact_registry_detection() -> None:
    rc = RegistryClient(insecure_hosts={"127.0.0.1", "registry.local"})
    assert rc._base("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert rc._base("registry.local:5000") == "http://registry.local:5000"
    assert rc._base("us-central1-docker.pkg.dev") == "https://us-central1-docker.pkg.dev"
    assert is_artifact_registry("us-central1-docker.pkg.dev")
    assert not is_artifact_registry("127.0.0.1:5000")


async def test_malformed_prefix_is_permanent(client: RegistryClient) -> None:
    with pytest.raises(PermanentError, match="no repository path"):
        await client.check("127.0.0.1:5000", "img", "t")


class _RefreshingCreds:
    """Stands in for google-auth credentials: refresh() is blocking, as the real one is."""

    service_account_email = "deployer@dv-platform-prod.iam.gserviceaccount.com"

    def __init__(self) -> None:
        self.token: str | None = None
        self.refreshes = 0
        self.threads: set[int] = set()

    @property
    def valid(self) -> bool:
        return self.token is not None

    def refresh(self, request: object) -> None:
        self.refreshes += 1
        self.threads.add(threading.get_ident())
        time.sleep(0.05)
        self.token = "ya29.fresh"


async def test_google_token_refreshes_once_off_the_event_loop() -> None:
    creds = _RefreshingCreds()
    google = GoogleAccessToken(creds)
    tokens = await asyncio.gather(*(google.token() for _ in range(5)))
    assert tokens == ["ya29.fresh"] * 5
    assert creds.refreshes == 1
    assert threading.get_ident() not in creds.threads
    assert google.identity == "oauth2accesstoken (google: deployer@dv-platform-prod.iam.gserviceaccount.com)"
    assert await google.basic() == ("oauth2accesstoken", "ya29.fresh")
