"""OCI distribution client for every registry: tag checks with real platforms, and digest-preserving promotion.

One client talks to all three environments' registries (Artifact Registry in production, Debian
docker-registry in the test bed). It never deletes anything.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Protocol, Self, TypeVar

import aiohttp
import stamina
from yarl import URL

from bot.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
# All four, always: a partial Accept makes registries answer 404, or silently swap a list for one child.
MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX)
ACCEPT = ", ".join(MANIFEST_TYPES)
INDEX_TYPES = frozenset({DOCKER_LIST, OCI_INDEX})

ACCESS_TOKEN_USER = "oauth2accesstoken"  # noqa: S105 - the fixed user name Artifact Registry expects
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
DEFAULT_INSECURE_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
CHUNK = 256 * 1024

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# results


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


@dataclass(frozen=True)
class PromoteProgress:
    blobs_done: int
    blobs_total: int
    bytes_copied: int


@dataclass(frozen=True)
class PromoteResult:
    digest: str
    noop: bool
    blobs_copied: int
    blobs_skipped: int
    bytes_copied: int


# ---------------------------------------------------------------------------------------------
# credentials


class Credentials(Protocol):
    """A way to authenticate to one registry host; `identity` is safe to show to a person."""

    @property
    def identity(self) -> str: ...

    async def basic(self) -> tuple[str, str] | None:
        """User and password for a token realm or a Basic challenge; None means anonymous."""
        ...

    async def bearer(self) -> str | None:
        """A token to send before any challenge (Artifact Registry takes OAuth access tokens so)."""
        ...


class Anonymous:
    identity = "anonymous"

    async def basic(self) -> tuple[str, str] | None:
        return None

    async def bearer(self) -> str | None:
        return None


class BasicCredentials:
    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password

    @property
    def identity(self) -> str:
        return f"basic user {self.username}"

    async def basic(self) -> tuple[str, str] | None:
        return self.username, self._password

    async def bearer(self) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"BasicCredentials({self.username!r}, <password>)"


class GoogleAccessToken:
    """OAuth access token from google-auth (application default credentials unless given).

    google-auth is synchronous: discovery and refresh run in a thread, one at a time.
    """

    def __init__(
        self,
        credentials: Any = None,
        *,
        scopes: Iterable[str] = (CLOUD_PLATFORM_SCOPE,),
        refresh_timeout: float = 30.0,
    ) -> None:
        self._creds = credentials
        self._scopes = tuple(scopes)
        self._refresh_timeout = refresh_timeout
        self._lock = asyncio.Lock()

    @property
    def identity(self) -> str:
        email = None
        if self._creds is not None:
            email = getattr(self._creds, "service_account_email", None) or getattr(
                self._creds, "signer_email", None
            )
        who = (
            email
            if isinstance(email, str) and email and email != "default"
            else "application default credentials"
        )
        return f"{ACCESS_TOKEN_USER} (google: {who})"

    async def token(self) -> str:
        from google.auth import exceptions as gexc  # noqa: PLC0415 - keep google-auth off the import path until used
        from google.auth.transport.requests import Request  # noqa: PLC0415

        async with self._lock:
            try:
                if self._creds is None:
                    import google.auth  # noqa: PLC0415

                    async with asyncio.timeout(self._refresh_timeout):
                        self._creds, _ = await asyncio.to_thread(
                            google.auth.default, scopes=list(self._scopes)
                        )
                if not self._creds.valid:
                    async with asyncio.timeout(self._refresh_timeout):
                        await asyncio.to_thread(self._creds.refresh, Request())
            except gexc.DefaultCredentialsError as e:
                raise PermanentError(
                    f"no Google credentials for Artifact Registry: {e}",
                    hint="Set GOOGLE_APPLICATION_CREDENTIALS or use Workload Identity for the bot's pod.",
                ) from None
            except gexc.RefreshError as e:
                raise PermanentError(
                    f"Google refused to issue an access token for {self.identity}: {str(e)[:200]}",
                    hint="Check that the service account exists, is enabled and its key is valid.",
                ) from None
            except (gexc.TransportError, TimeoutError) as e:
                raise TransientError(f"could not reach Google to refresh the access token: {e}") from None
            token = self._creds.token
        if not isinstance(token, str) or not token:
            raise PermanentError(f"google-auth returned no access token for {self.identity}")
        return token

    async def basic(self) -> tuple[str, str] | None:
        return ACCESS_TOKEN_USER, await self.token()

    async def bearer(self) -> str | None:
        return await self.token()


def is_artifact_registry(host: str) -> bool:
    return host.split(":", 1)[0].endswith("-docker.pkg.dev")


class DefaultCredentials:
    """Google access token for Artifact Registry hosts, explicit credentials by host, anonymous otherwise."""

    def __init__(
        self, by_host: Mapping[str, Credentials] | None = None, google: Credentials | None = None
    ) -> None:
        self._by_host = dict(by_host or {})
        self._google = google

    def __call__(self, host: str) -> Credentials:
        if host in self._by_host:
            return self._by_host[host]
        if is_artifact_registry(host):
            if self._google is None:
                self._google = GoogleAccessToken()
            return self._google
        return Anonymous()


# ---------------------------------------------------------------------------------------------
# internals


class _Retryable(Exception):
    """Internal signal to stamina; turned into TransientError before it leaves the client.

    `delay`: the seconds the registry asked for (429/503 `Retry-After`), waited instead of the backoff."""

    def __init__(self, host: str, detail: str, *, delay: float | None = None) -> None:
        super().__init__(f"{host}: {detail}")
        self.host = host
        self.detail = detail
        self.delay = delay


def retry_after(value: str | None, *, cap: float) -> float | None:
    """A `Retry-After` header (delta-seconds or an HTTP date) as seconds to wait, at most `cap`."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            at = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if at.tzinfo is None:
            return None
        seconds = (at - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), cap)


def _on_retryable(exc: Exception) -> bool | float:
    """stamina's hook: retry a _Retryable, after the registry's own Retry-After when it gave one."""
    if isinstance(exc, _Retryable):
        return exc.delay if exc.delay is not None else True
    return False


@dataclass
class _HostAuth:
    mode: Literal["unknown", "anonymous", "token", "basic"] = "unknown"
    realm: str = ""
    service: str = ""
    direct_bearer_failed: bool = False


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


_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_RE.findall(rest))


def _platform(os_: Any, arch: Any, variant: Any = None) -> str:
    p = f"{os_}/{arch}"
    return f"{p}/{variant}" if variant else p


def _matches(requested: str, available: str) -> bool:
    req = requested.split("/")
    have = available.split("/")
    if req[:2] != have[:2]:
        return False
    return len(req) < 3 or (len(have) >= 3 and req[2] == have[2])


def _error_text(body: bytes) -> str:
    """The registry's own error codes, short: bodies can be large and must not flood messages."""
    try:
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        text = body[:200].decode("utf-8", "replace")
    return text[:300]


class RegistryClient:
    """Async OCI distribution client. Use as `async with RegistryClient() as rc:`.

    Timeouts: `timeout` bounds each metadata request; blob streams are bounded by connect and
    idle-read timeouts instead, since a large layer may take minutes. 5xx, 429, resets and timeouts
    are retried with exponential backoff (`attempts`), then reported as TransientError.
    """

    def __init__(
        self,
        *,
        credentials: Callable[[str], Credentials] | None = None,
        insecure_hosts: Collection[str] = DEFAULT_INSECURE_HOSTS,
        timeout: float = 30.0,
        stream_idle_timeout: float = 60.0,
        attempts: int = 4,
        wait_initial: float = 0.2,
        wait_max: float = 5.0,
        retry_budget: float = 120.0,
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
        self._hosts: dict[str, _HostAuth] = {}
        self._creds: dict[str, Credentials] = {}
        self._tokens: dict[tuple[str, str, tuple[str, ...]], tuple[str, float]] = {}
        self._token_locks: dict[tuple[str, str, tuple[str, ...]], asyncio.Lock] = {}

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

    def _creds_for(self, host: str) -> Credentials:
        if host not in self._creds:
            self._creds[host] = self._credentials(host)
        return self._creds[host]

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
            raise TransientError(
                f"registry {e.host} unavailable: {e.detail}",
                hint=f"Gave up after {self._attempts} attempts; retry later or check the registry's status.",
                delay=e.delay,  # the step's own retry waits as long as the registry asked
            ) from None
        raise AssertionError("stamina ended without a result")  # pragma: no cover

    async def _token(self, host: str, auth: _HostAuth, scopes: tuple[str, ...]) -> str:
        key = (auth.realm, auth.service, scopes)
        cached = self._tokens.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        # one fetch per scope even when many requests hit an unknown scope at once
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            creds = self._creds_for(host)
            basic = await creds.basic()
            headers = {"Authorization": aiohttp.encode_basic_auth(*basic)} if basic else {}
            params = [("service", auth.service)] if auth.service else []
            params += [("scope", s) for s in scopes]
            realm_host = URL(auth.realm).host or auth.realm
            try:
                async with self.session.get(auth.realm, params=params, headers=headers) as r:
                    body = await r.read()
                    status = r.status
                    wait = retry_after(r.headers.get("Retry-After"), cap=self._retry_budget)
            except (aiohttp.ClientError, TimeoutError) as e:
                raise _Retryable(realm_host, f"token endpoint {auth.realm}: {type(e).__name__} {e}") from e
            if status in (401, 403):
                raise PermanentError(
                    f"registry {host} token service refused {creds.identity} (HTTP {status}) "
                    f"for {' '.join(scopes)}: {_error_text(body)}",
                    hint=self._auth_hint(host, creds),
                )
            if status >= 500 or status == 429:
                raise _Retryable(realm_host, f"token endpoint answered HTTP {status}", delay=wait)
            if status != 200:
                raise PermanentError(
                    f"registry {host} token endpoint answered HTTP {status}: {_error_text(body)}"
                )
            try:
                payload = json.loads(body)
                token = payload.get("token") or payload["access_token"]
                ttl = float(payload.get("expires_in") or 60)
            except (ValueError, KeyError, TypeError):
                raise PermanentError(f"registry {host} token endpoint sent an unreadable answer") from None
            # renew a little early so a token never expires between the cache check and the request
            self._tokens[key] = (str(token), time.monotonic() + max(ttl - 10, ttl / 2))
            return str(token)

    async def _auth_headers(self, host: str, scopes: tuple[str, ...]) -> dict[str, str]:
        auth = self._hosts.setdefault(host, _HostAuth())
        creds = self._creds_for(host)
        if auth.mode == "token":
            return {"Authorization": f"Bearer {await self._token(host, auth, scopes)}"}
        if auth.mode == "basic":
            basic = await creds.basic()
            return {"Authorization": aiohttp.encode_basic_auth(*basic)} if basic else {}
        if auth.mode == "unknown" and not auth.direct_bearer_failed:
            bearer = await creds.bearer()
            if bearer:
                return {"Authorization": f"Bearer {bearer}"}
        return {}

    def _auth_hint(self, host: str, creds: Credentials) -> str:
        if is_artifact_registry(host):
            return (
                f"Grant {creds.identity} Artifact Registry Reader (to check and pull) or Writer (to promote) "
                f"on this repository, or fix the bot's Google credentials."
            )
        if isinstance(creds, Anonymous):
            return f"Registry {host} needs credentials: configure them for this host."
        return f"Check the credentials configured for {host} and their rights on this repository."

    def _denied(self, host: str, repo: str, action: str, status: int, body: bytes) -> PermanentError:
        creds = self._creds_for(host)
        return PermanentError(
            f"registry {host} denied {action} on repository {repo} for {creds.identity} "
            f"(HTTP {status}: {_error_text(body)})",
            hint=self._auth_hint(host, creds),
        )

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
            if resp.status in (401, 403):
                body = await resp.read()
                resp.release()
                raise self._denied(host, repo, action, resp.status, body)
            if resp.status >= 500 or resp.status == 429:
                body = await resp.read()
                resp.release()
                raise _Retryable(
                    host,
                    f"{method} {URL(url).path} answered HTTP {resp.status} {_error_text(body)}",
                    delay=retry_after(resp.headers.get("Retry-After"), cap=self._retry_budget),
                )
            if auth.mode == "unknown" and not sent_direct_bearer:
                auth.mode = "anonymous"
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def _get_manifest(self, repo: _Repo, ref: str, scopes: tuple[str, ...]) -> _Manifest | None:
        async def op() -> _Manifest | None:
            r = await self._request(
                "GET",
                repo.host,
                f"/v2/{repo.name}/manifests/{ref}",
                repo=repo.name,
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
            r = await self._request(
                "HEAD",
                repo.host,
                f"/v2/{repo.name}/manifests/{ref}",
                repo=repo.name,
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
            r = await self._request(
                "GET",
                repo.host,
                f"/v2/{repo.name}/blobs/{digest}",
                repo=repo.name,
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

    # -- promote --------------------------------------------------------------------------------

    async def promote(
        self,
        src_prefix: str,
        dst_prefix: str,
        image: str,
        tag: str,
        *,
        concurrency: int = 4,
        progress: Callable[[PromoteProgress], None] | None = None,
    ) -> PromoteResult:
        """Copy `<src>/<image>:<tag>` with all its platforms to `<dst>`, keeping the digest.

        Order matters for readers of the target: blobs, then child manifests by digest, then the
        index by digest, and the tag last, so the tag never points at something incomplete.
        """
        src = _Repo.parse(src_prefix, image)
        dst = _Repo.parse(dst_prefix, image)
        src_scopes = (f"repository:{src.name}:pull",)
        dst_scopes = (f"repository:{dst.name}:pull,push",)
        existing, top = await asyncio.gather(
            self._head_manifest(dst, tag, dst_scopes, "push"),
            self._get_manifest(src, tag, src_scopes),
        )
        if top is None:
            raise PermanentError(
                f"{src_prefix.rstrip('/')}/{image}:{tag} is not in the source registry: nothing to promote",
                hint="Build the image for this commit, or promote from an environment that has it.",
            )
        if existing == top.digest:
            return PromoteResult(top.digest, True, 0, 0, 0)

        children: list[_Manifest] = []
        if top.media_type in INDEX_TYPES or "manifests" in top.data:
            refs = [e["digest"] for e in top.data.get("manifests") or []]
            fetched = await asyncio.gather(*(self._get_manifest(src, d, src_scopes) for d in refs))
            for d, child in zip(refs, fetched, strict=True):
                if child is None:
                    raise PermanentError(
                        f"{src.host}/{src.name}:{tag} lists {d} but the registry does not have it"
                    )
                if child.media_type in INDEX_TYPES:
                    raise PermanentError(f"{src.host}/{src.name}:{tag} nests an index ({d}); not supported")
                children.append(child)
        manifests = children or [top]

        blobs: dict[str, int] = {}
        for m in manifests:
            for desc in [m.data.get("config") or {}, *(m.data.get("layers") or [])]:
                if desc.get("digest"):
                    blobs[desc["digest"]] = int(desc.get("size") or 0)

        counters = {"copied": 0, "skipped": 0, "bytes": 0, "done": 0}
        sem = asyncio.Semaphore(max(1, concurrency))
        mount_scopes = tuple(sorted({*dst_scopes, *src_scopes}))

        async def one(digest: str, size: int) -> None:
            async with sem:
                copied = await self._copy_blob(
                    src,
                    dst,
                    digest,
                    size,
                    dst_scopes=dst_scopes,
                    src_scopes=src_scopes,
                    mount_scopes=mount_scopes,
                )
            if copied is None:
                counters["skipped"] += 1
            else:
                counters["copied"] += 1
                counters["bytes"] += copied
            counters["done"] += 1
            if progress is not None:
                progress(PromoteProgress(counters["done"], len(blobs), counters["bytes"]))

        tasks = [asyncio.create_task(one(d, s), name=f"promote-blob-{d[7:19]}") for d, s in blobs.items()]
        try:
            await asyncio.gather(*tasks)
        finally:
            # one failed blob cancels the others: no upload keeps running after we report failure
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        for child in children:
            await self._put_manifest(dst, child.digest, child, dst_scopes)
        await self._put_manifest(dst, top.digest, top, dst_scopes)
        await self._put_manifest(dst, tag, top, dst_scopes)

        final = await self._head_manifest(dst, tag, dst_scopes, "push")
        if final != top.digest:
            raise PermanentError(
                f"after promotion {dst_prefix.rstrip('/')}/{image}:{tag} points at {final}, expected {top.digest}",
                hint="Someone may have pushed the same tag concurrently; check the target registry.",
            )
        log.info(
            "promoted %s:%s from %s to %s (%s): %d blobs copied, %d already there, %d bytes",
            image,
            tag,
            src.host,
            dst.host,
            top.digest,
            counters["copied"],
            counters["skipped"],
            counters["bytes"],
        )
        return PromoteResult(top.digest, False, counters["copied"], counters["skipped"], counters["bytes"])

    async def _put_manifest(self, repo: _Repo, ref: str, m: _Manifest, scopes: tuple[str, ...]) -> None:
        async def op() -> None:
            r = await self._request(
                "PUT",
                repo.host,
                f"/v2/{repo.name}/manifests/{ref}",
                repo=repo.name,
                scopes=scopes,
                action="push",
                headers={"Content-Type": m.media_type},
                data=lambda: m.body,
            )
            async with r:
                if r.status not in (200, 201):
                    body = await r.read()
                    raise PermanentError(
                        f"registry {repo.host} refused manifest {ref} for {repo.name} "
                        f"(HTTP {r.status}: {_error_text(body)})"
                    )

        await self._retrying(op)

    async def _blob_exists(self, repo: _Repo, digest: str, scopes: tuple[str, ...]) -> bool:
        async def op() -> bool:
            r = await self._request(
                "HEAD",
                repo.host,
                f"/v2/{repo.name}/blobs/{digest}",
                repo=repo.name,
                scopes=scopes,
                action="push",
            )
            async with r:
                return r.status == 200

        return await self._retrying(op)

    def _upload_url(self, repo: _Repo, location: str, digest: str) -> URL:
        url = URL(location)
        if not url.is_absolute():
            url = URL(self._base(repo.host)).join(url)
        # the Location carries the registry's signed `_state`: add the digest, keep the rest
        return url.update_query({"digest": digest})

    async def _copy_blob(
        self,
        src: _Repo,
        dst: _Repo,
        digest: str,
        size: int,
        *,
        dst_scopes: tuple[str, ...],
        src_scopes: tuple[str, ...],
        mount_scopes: tuple[str, ...],
    ) -> int | None:
        """Returns None when the target already had the blob, else the bytes streamed (0 if mounted)."""
        if await self._blob_exists(dst, digest, dst_scopes):
            return None

        async def start_upload() -> str | None:
            same_host = src.host == dst.host
            path = f"/v2/{dst.name}/blobs/uploads/"
            if same_host:
                path += f"?mount={digest}&from={src.name}"
            r = await self._request(
                "POST",
                dst.host,
                path,
                repo=dst.name,
                scopes=mount_scopes if same_host else dst_scopes,
                action="push",
                headers={"Content-Length": "0"},
            )
            async with r:
                if r.status == 201 and same_host:
                    return None  # mounted: the registry linked the blob without a byte moving
                if r.status != 202 or "Location" not in r.headers:
                    body = await r.read()
                    raise PermanentError(
                        f"registry {dst.host} refused to start an upload to {dst.name} "
                        f"(HTTP {r.status}: {_error_text(body)})"
                    )
                return r.headers["Location"]

        async def copy() -> int:
            location = await start_upload()
            if location is None:
                return 0
            return await self._stream_blob(
                src, dst, digest, size, location=location, src_scopes=src_scopes, dst_scopes=dst_scopes
            )

        return await self._retrying(copy)

    async def _stream_blob(
        self,
        src: _Repo,
        dst: _Repo,
        digest: str,
        size: int,
        *,
        location: str,
        src_scopes: tuple[str, ...],
        dst_scopes: tuple[str, ...],
    ) -> int:
        get = await self._request(
            "GET",
            src.host,
            f"/v2/{src.name}/blobs/{digest}",
            repo=src.name,
            scopes=src_scopes,
            action="pull",
            stream=True,
        )
        source_failure: list[BaseException] = []
        sent = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            try:
                async for chunk in get.content.iter_chunked(CHUNK):
                    sent += len(chunk)
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as e:
                source_failure.append(e)
                raise
            if sent != size:
                err = _Retryable(src.host, f"blob {digest} ended after {sent} of {size} bytes")
                source_failure.append(err)
                raise err

        async with get:
            if get.status != 200:
                raise PermanentError(
                    f"registry {src.host} lists blob {digest} in {src.name} but answered HTTP {get.status} for it"
                )
            length = int(get.headers.get("Content-Length") or size)
            if length != size:
                raise PermanentError(
                    f"blob {digest} in {src.host}/{src.name} is {length} bytes, manifest says {size}"
                )
            try:
                # one monolithic PUT with Content-Length: Artifact Registry refuses chunked uploads
                put = await self._request(
                    "PUT",
                    dst.host,
                    self._upload_url(dst, location, digest),
                    repo=dst.name,
                    scopes=dst_scopes,
                    action="push",
                    stream=True,
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                    data=body,
                )
            except _Retryable as e:
                if source_failure:
                    raise _Retryable(
                        src.host, f"reading blob {digest} failed after {sent} bytes: {source_failure[0]}"
                    ) from e
                raise
            except PermanentError:
                raise
            async with put:
                if put.status != 201:
                    text = await put.read()
                    if source_failure:
                        raise _Retryable(src.host, f"reading blob {digest} failed after {sent} bytes")
                    raise PermanentError(
                        f"registry {dst.host} refused blob {digest} for {dst.name} (HTTP {put.status}: {_error_text(text)})"
                    )
        return size
