"""The registry client's request primitives and tag checks: sessions, retries, manifests and blobs.

`RegistryClient` (promote.py) adds promotion on top of the base here.

Retries: this client is the one layer that retries a registry (5xx, 429 after its Retry-After, resets,
timeouts), within `timeouts.registry`. What outlasts them is a RegistryUnavailable, which the steps
calling the registry do not retry again: their own retries would multiply these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, NotRequired, Self, TypedDict, TypeVar, Unpack

import aiohttp
import stamina
from yarl import URL

from bot.adapters.registry.auth import _HostAuth, _parse_challenge, _TokenAuth
from bot.adapters.registry.credentials import Credentials, DefaultCredentials
from bot.adapters.registry.wire import _error_text, _on_retryable, _raise_for_refusal, _Retryable
from bot.budgets import DEFAULT_TIMEOUTS
from bot.errors import PermanentError, TransientError

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# All four, always: a partial Accept makes registries answer 404, or silently swap a list for one child.
MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX)
ACCEPT = ", ".join(MANIFEST_TYPES)
INDEX_TYPES = frozenset({DOCKER_LIST, OCI_INDEX})

DEFAULT_INSECURE_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

T = TypeVar("T")


@dataclass(frozen=True)
class ImageStatus:
    """What the registry says about one image tag for the platform the clusters run."""

    state: Literal["missing", "wrong_platform", "ok"]
    digest: str | None
    platforms: tuple[str, ...]
    reference: str

    @property
    def ok(self) -> bool:
        return self.state == "ok"


class _RepoRequestArgs(TypedDict):
    """The rest of `BaseClient._request`'s keywords, as `_repo_request` passes them on."""

    scopes: tuple[str, ...]
    action: str
    headers: NotRequired[Mapping[str, str] | None]
    data: NotRequired[Callable[[], Any] | None]
    stream: NotRequired[bool]


@dataclass(frozen=True)
class _Repo:
    host: str
    name: str

    @classmethod
    def parse(cls, prefix: str, image: str) -> _Repo:
        prefix = prefix.strip().rstrip("/")
        if "/" not in prefix:
            raise PermanentError(f"registry prefix {prefix!r} has no repository path (expected host/path)")
        host, path = prefix.split("/", 1)
        return cls(host, f"{path}/{image}")


@dataclass
class _Manifest:
    media_type: str
    body: bytes
    digest: str
    data: dict[str, Any] = field(default_factory=dict)


def _platform(os_: Any, arch: Any, variant: Any = None) -> str:
    p = f"{os_}/{arch}"
    return f"{p}/{variant}" if variant else p


def _matches(requested: str, available: str) -> bool:
    req = requested.split("/")
    have = available.split("/")
    if req[:2] != have[:2]:
        return False
    return len(req) < 3 or (len(have) >= 3 and req[2] == have[2])


class RegistryUnavailable(TransientError):
    """The registry kept failing through every attempt of the client's own retries."""


_BUDGETS = DEFAULT_TIMEOUTS.registry


class BaseClient(_TokenAuth):
    """Tag checks and the request primitives RegistryClient's promotion is built on.

    Timeouts: `timeout` bounds each metadata request; blob streams are bounded by connect and
    idle-read timeouts instead, since a large layer may take minutes. 5xx, 429, resets and timeouts
    are retried with exponential backoff (`attempts`), then reported as RegistryUnavailable.
    """

    def __init__(
        self,
        *,
        credentials: Callable[[str], Credentials] | None = None,
        insecure_hosts: Collection[str] = DEFAULT_INSECURE_HOSTS,
        timeout: float = _BUDGETS.request,
        stream_idle_timeout: float = _BUDGETS.stream_idle,
        attempts: int = _BUDGETS.attempts,
        wait_initial: float = 0.2,
        wait_max: float = 5.0,
        retry_budget: float = _BUDGETS.retries,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._credentials = credentials or DefaultCredentials()
        self._insecure = frozenset(insecure_hosts)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=min(timeout, 10.0), sock_read=stream_idle_timeout
        )
        self._attempts = attempts
        self._wait_initial = wait_initial
        self._wait_max = wait_max
        self._retry_budget = retry_budget
        self._session = session
        self._own_session = session is None
        # token auth's state, typed where _TokenAuth declares it
        self._hosts = {}
        self._creds = {}
        self._tokens = {}
        self._token_locks = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    # -- plumbing -------------------------------------------------------------------------------

    def _base(self, host: str) -> str:
        bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        scheme = "http" if host in self._insecure or bare in self._insecure else "https"
        return f"{scheme}://{host}"

    async def _retrying(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            async for attempt in stamina.retry_context(
                on=_on_retryable,
                attempts=self._attempts,
                timeout=self._retry_budget,
                wait_initial=self._wait_initial,
                wait_max=self._wait_max,
                wait_jitter=self._wait_initial,
            ):
                with attempt:
                    return await op()
        except _Retryable as e:
            raise RegistryUnavailable(
                f"registry {e.host} unavailable: {e.detail}",
                hint=f"Gave up after {self._attempts} attempts; retry later or check the registry's status.",
                delay=e.delay,  # how long the registry asked to wait, for whoever tries again later
            ) from None
        raise AssertionError("stamina ended without a result")  # pragma: no cover

    async def _request(
        self,
        method: str,
        host: str,
        url: str | URL,
        *,
        repo: str,
        scopes: tuple[str, ...],
        action: str,
        headers: Mapping[str, str] | None = None,
        data: Callable[[], Any] | None = None,
        stream: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send one request with auth; the caller releases the response. 401/403 -> PermanentError,
        5xx/429/timeouts -> _Retryable, anything else is returned for the caller to judge."""
        if isinstance(url, str) and url.startswith("/"):
            url = self._base(host) + url
        timeout = self._stream_timeout if stream else self._timeout
        auth = self._hosts.setdefault(host, _HostAuth())
        for attempt in range(2):
            hdrs = {**(headers or {}), **(await self._auth_headers(host, scopes))}
            sent_direct_bearer = auth.mode == "unknown" and "Authorization" in hdrs
            sent_registry_token = auth.mode == "token"
            try:
                resp = await self.session.request(
                    method, url, headers=hdrs, data=data() if data else None, timeout=timeout
                )
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
                raise _Retryable(host, f"{method} {URL(url).path}: {type(e).__name__} {e}".strip()) from e
            if resp.status in (401, 403) and attempt == 0:
                challenge = resp.headers.get("WWW-Authenticate", "")
                body = await resp.read()
                resp.release()
                scheme, params = _parse_challenge(challenge)
                if sent_direct_bearer:
                    auth.direct_bearer_failed = True
                if scheme == "bearer" and "realm" in params:
                    if sent_registry_token:
                        # our token was not enough: ask again, with the scopes the registry named;
                        # requests that raced the first challenge sent none and must not drop it
                        self._tokens.pop((auth.realm, auth.service, scopes), None)
                    auth.mode, auth.realm, auth.service = "token", params["realm"], params.get("service", "")
                    wanted = tuple(params["scope"].split()) if params.get("scope") else ()
                    scopes = tuple(sorted({*scopes, *wanted}))
                    continue
                if scheme == "basic" and auth.mode != "basic":
                    auth.mode = "basic"
                    continue
                if sent_direct_bearer and resp.status == 401:
                    continue
                raise self._denied(host, repo, action, resp.status, body)
            await _raise_for_refusal(
                resp,
                host,
                cap=self._retry_budget,
                denied=lambda status, body: self._denied(host, repo, action, status, body),
                retry=lambda status, body: (
                    f"{method} {URL(url).path} answered HTTP {status} {_error_text(body)}"
                ),
            )
            if auth.mode == "unknown" and not sent_direct_bearer:
                auth.mode = "anonymous"
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def _repo_request(
        self, method: str, repo: _Repo, path: str, **kw: Unpack[_RepoRequestArgs]
    ) -> aiohttp.ClientResponse:
        """`_request` for `/v2/<repository>/<path>` on the repository's own host."""
        return await self._request(method, repo.host, f"/v2/{repo.name}/{path}", repo=repo.name, **kw)

    async def _get_manifest(self, repo: _Repo, ref: str, scopes: tuple[str, ...]) -> _Manifest | None:
        async def op() -> _Manifest | None:
            r = await self._repo_request(
                "GET",
                repo,
                f"manifests/{ref}",
                scopes=scopes,
                action="pull",
                headers={"Accept": ACCEPT},
            )
            async with r:
                try:
                    body = await r.read()
                except (aiohttp.ClientError, TimeoutError) as e:
                    raise _Retryable(repo.host, f"reading manifest {ref}: {e}") from e
                if r.status == 404:
                    return None
                if r.status != 200:
                    raise PermanentError(
                        f"registry {repo.host} answered HTTP {r.status} for {repo.name}:{ref}: {_error_text(body)}"
                    )
                digest = (
                    r.headers.get("Docker-Content-Digest") or f"sha256:{hashlib.sha256(body).hexdigest()}"
                )
                ctype = r.headers.get("Content-Type", "").split(";")[0].strip()
            try:
                data = json.loads(body)
            except ValueError:
                raise PermanentError(
                    f"registry {repo.host} sent a manifest for {repo.name}:{ref} that is not JSON"
                ) from None
            media_type = data.get("mediaType") or ctype
            return _Manifest(media_type, body, digest, data)

        return await self._retrying(op)

    async def _head_manifest(self, repo: _Repo, ref: str, scopes: tuple[str, ...], action: str) -> str | None:
        async def op() -> str | None:
            r = await self._repo_request(
                "HEAD",
                repo,
                f"manifests/{ref}",
                scopes=scopes,
                action=action,
                headers={"Accept": ACCEPT},
            )
            async with r:
                if r.status == 404:
                    return None
                if r.status != 200:
                    raise PermanentError(
                        f"registry {repo.host} answered HTTP {r.status} for {repo.name}:{ref}"
                    )
                return r.headers.get("Docker-Content-Digest")

        return await self._retrying(op)

    async def _get_blob_json(self, repo: _Repo, digest: str, scopes: tuple[str, ...]) -> dict[str, Any]:
        async def op() -> dict[str, Any]:
            r = await self._repo_request(
                "GET",
                repo,
                f"blobs/{digest}",
                scopes=scopes,
                action="pull",
            )
            async with r:
                try:
                    body = await r.content.read(4 * 1024 * 1024)
                except (aiohttp.ClientError, TimeoutError) as e:
                    raise _Retryable(repo.host, f"reading blob {digest}: {e}") from e
                if r.status != 200:
                    raise PermanentError(
                        f"registry {repo.host} has the manifest of {repo.name} but not its config blob {digest} "
                        f"(HTTP {r.status})"
                    )
            try:
                data = json.loads(body)
            except ValueError:
                raise PermanentError(f"config blob {digest} in {repo.host}/{repo.name} is not JSON") from None
            return data if isinstance(data, dict) else {}

        return await self._retrying(op)

    # -- check ----------------------------------------------------------------------------------

    async def check(
        self, registry_prefix: str, image: str, tag: str, platform: str = "linux/amd64"
    ) -> ImageStatus:
        """Is `<prefix>/<image>:<tag>` in that registry, and does it run on `platform`?"""
        repo = _Repo.parse(registry_prefix, image)
        reference = f"{registry_prefix.rstrip('/')}/{image}:{tag}"
        scopes = (f"repository:{repo.name}:pull",)
        m = await self._get_manifest(repo, tag, scopes)
        if m is None:
            return ImageStatus("missing", None, (), reference)
        platforms = await self._platforms(repo, m, scopes)
        state: Literal["wrong_platform", "ok"] = (
            "ok" if any(_matches(platform, p) for p in platforms) else "wrong_platform"
        )
        return ImageStatus(state, m.digest, platforms, reference)

    async def _platforms(self, repo: _Repo, m: _Manifest, scopes: tuple[str, ...]) -> tuple[str, ...]:
        if m.media_type in INDEX_TYPES or "manifests" in m.data:
            out: list[str] = []
            for entry in m.data.get("manifests") or []:
                p = entry.get("platform") or {}
                annotations = entry.get("annotations") or {}
                if p.get("os") == "unknown" or p.get("architecture") == "unknown":
                    continue  # buildx attestation manifests, not runnable images
                if annotations.get("vnd.docker.reference.type") == "attestation-manifest":
                    continue
                plat = _platform(p.get("os"), p.get("architecture"), p.get("variant"))
                if plat not in out:
                    out.append(plat)
            return tuple(out)
        config = (m.data.get("config") or {}).get("digest")
        if not config:
            return ()
        cfg = await self._get_blob_json(repo, config, scopes)
        if not cfg.get("os") or not cfg.get("architecture"):
            return ()
        return (_platform(cfg["os"], cfg["architecture"], cfg.get("variant")),)
