"""Test-bed part: real OCI registries (Debian docker-registry) per environment, and synthetic image pushers.

Usable outside pytest (`make demo`): `async with Registries() as regs: ...`, `await push_image(...)`.
As a pytest plugin it provides the `registries` and `registry` fixtures. Both are function-scoped:
a docker-registry process starts in a few milliseconds, so each test gets empty registries and
cannot see another test's tags.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

import aiohttp
import pytest
import yaml
from yarl import URL

if TYPE_CHECKING:
    from tests.testbed.tokenauth import TokenServer

ENV_NAMES = ("production", "staging", "poc")

# The path part of each real Artifact Registry prefix, so local prefixes look like the real ones.
ENV_PATHS = {
    "production": "dv-platform-prod/containers-production",
    "staging": "dv-platform-staging/containers-staging",
    "poc": "rich-compiler-479518-d2/containers-poc",
}

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IN_TOTO = "application/vnd.in-toto+json"
ALL_MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX)
ACCEPT = ", ".join(ALL_MANIFEST_TYPES)

_LISTENING_RE = re.compile(r"listening on (127\.0\.0\.1:\d+)")
_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=5, sock_read=60)
CHUNK = 1 << 20


class LocalRegistry:
    """One `docker-registry serve` process on 127.0.0.1 with filesystem storage in its own directory.

    stop() then start() again restarts on the same port and storage, so a test can kill a registry
    mid-operation and bring it back with its blobs intact.
    """

    def __init__(
        self,
        name: str = "registry",
        *,
        root: Path | None = None,
        token_server: TokenServer | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix=f"registry-{name}-")) if root is None else root
        self.token_server = token_server
        self.start_timeout = start_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._port: int | None = None
        self._log_fh: Any = None

    @property
    def storage(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    @property
    def host(self) -> str:
        if self._port is None:
            raise RuntimeError(f"registry {self.name} is not started")
        return f"127.0.0.1:{self._port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int:
        """The registry process's pid (to SIGSTOP it, as a hung registry)."""
        assert self._proc is not None, "the registry is not running"
        return self._proc.pid

    def _config(self) -> dict[str, Any]:
        port = self._port if self._port is not None else 0
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            # distribution signs upload state with this secret; a random one per process would make
            # an upload started before a restart unusable after it.
            "http": {"addr": f"127.0.0.1:{port}", "secret": f"testbed-{self.name}-secret"},
        }
        if self.token_server is not None:
            ts = self.token_server
            cfg["auth"] = {
                "token": {
                    "realm": ts.realm,
                    "service": ts.service,
                    "issuer": ts.issuer,
                    "rootcertbundle": str(ts.cert_path),
                }
            }
        return cfg

    async def start(self) -> None:
        if self.running:
            return
        self.storage.mkdir(parents=True, exist_ok=True)
        cfg_path = self.root / "config.yml"
        cfg_path.write_text(yaml.safe_dump(self._config()), encoding="utf-8")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_fh = self.log_path.open("ab")
        self._proc = await asyncio.create_subprocess_exec(
            "docker-registry",
            "serve",
            str(cfg_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=self._log_fh,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while True:
            text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            m = _LISTENING_RE.search(text)
            if m:
                self._port = int(m.group(1).rsplit(":", 1)[1])
                break
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise RuntimeError(
                    f"docker-registry {self.name} did not start (exit {self._proc and self._proc.returncode}); "
                    f"log:\n{text[-2000:]}"
                )
            await asyncio.sleep(0.01)
        await self._wait_ready(deadline)

    async def _wait_ready(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while True:
                try:
                    async with s.get(f"{self.url}/v2/") as r:
                        if r.status in (200, 401):
                            return
                except aiohttp.ClientError:
                    pass
                if loop.time() > deadline:
                    raise RuntimeError(f"docker-registry {self.name} at {self.url} never answered /v2/")
                await asyncio.sleep(0.01)

    async def stop(self, grace: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    async def kill(self) -> None:
        """Die abruptly (SIGKILL), as a crashed or unreachable registry would."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        await self.stop()

    def cleanup(self) -> None:
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
        self.cleanup()


class Registries:
    """One LocalRegistry per environment, started concurrently."""

    def __init__(self, envs: Sequence[str] = ENV_NAMES) -> None:
        self.by_env = {env: LocalRegistry(env) for env in envs}

    def __getitem__(self, env: str) -> LocalRegistry:
        return self.by_env[env]

    def prefix(self, env: str) -> str:
        """The image prefix to put in the environments file, shaped like the real Artifact Registry one."""
        path = ENV_PATHS.get(env, f"testbed/containers-{env}")
        return f"{self.by_env[env].host}/{path}"

    def repository(self, env: str, image: str) -> str:
        """The repository name inside the registry (prefix without the host, plus the image)."""
        return f"{self.prefix(env).split('/', 1)[1]}/{image}"

    async def push(self, env: str, image: str, tag: str, kind: Kind = "amd64", **kw: Any) -> str:
        return await push_image(self.by_env[env].url, self.repository(env, image), tag, kind, **kw)

    async def delete_tag(self, env: str, image: str, tag: str) -> str:
        return await delete_tag(self.by_env[env].url, self.repository(env, image), tag)

    async def start(self) -> None:
        results = await asyncio.gather(*(r.start() for r in self.by_env.values()), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.by_env.values()))
        for r in self.by_env.values():
            r.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


# ---------------------------------------------------------------------------------------------
# Synthetic images pushed through the distribution API

Kind = Literal["amd64", "arm64", "multi"]
Format = Literal["oci", "docker"]


@dataclass(frozen=True)
class _Blob:
    """A blob described by its digest and size, with a way to stream its bytes again."""

    digest: str
    size: int
    chunks: Any  # Callable[[], Iterable[bytes]]


def _layer_chunks(seed: str, size: int) -> Iterable[bytes]:
    """Deterministic, incompressible-looking bytes, generated chunk by chunk so 1 GB never sits in memory."""
    base = random.Random(seed).randbytes(min(size, CHUNK) or 1)
    n = len(base)
    sent, i = 0, 0
    while sent < size:
        k = (i * 7919) % n
        chunk = base[k:] + base[:k]
        # a per-chunk prefix keeps chunks distinct even when the rotation repeats
        chunk = hashlib.sha256(f"{seed}/{i}".encode()).digest() + chunk[32:]
        take = min(n, size - sent)
        yield chunk[:take]
        sent += take
        i += 1


def _layer(seed: str, size: int) -> _Blob:
    h = hashlib.sha256()
    for c in _layer_chunks(seed, size):
        h.update(c)
    return _Blob(f"sha256:{h.hexdigest()}", size, lambda: _layer_chunks(seed, size))


def _bytes_blob(data: bytes) -> _Blob:
    return _Blob(f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), lambda: iter((data,)))


def _canon(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class _Pusher:
    """Minimal distribution API writer: monolithic blob uploads (POST + PUT), manifests by tag or digest.

    Token-auth registries are handled through the Bearer challenge with optional Basic credentials.
    """

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, repository: str, auth: tuple[str, str] | None
    ) -> None:
        self.s = session
        self.base = base_url.rstrip("/")
        self.repo = repository
        self.auth = auth
        self.token: str | None = None

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = dict(extra or {})
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    async def _authenticate(self, resp: aiohttp.ClientResponse) -> None:
        challenge = resp.headers.get("WWW-Authenticate", "")
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        if not challenge.startswith("Bearer") or "realm" not in params:
            raise RuntimeError(f"unexpected auth challenge {challenge!r}")
        query = [("service", params.get("service", ""))]
        query += [("scope", s) for s in params.get("scope", f"repository:{self.repo}:pull,push").split()]
        headers = {"Authorization": aiohttp.encode_basic_auth(*self.auth)} if self.auth else {}
        async with self.s.get(params["realm"], params=query, headers=headers) as r:
            r.raise_for_status()
            body = await r.json()
        self.token = body.get("token") or body["access_token"]

    async def call(
        self,
        method: str,
        url: str,
        *,
        ok: Iterable[int],
        body_factory: Any = None,
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        for attempt in range(2):
            data = body_factory() if body_factory else None
            resp = await self.s.request(method, url, data=data, headers=self._headers(headers))
            if resp.status == 401 and attempt == 0:
                await self._authenticate(resp)
                resp.release()
                continue
            if resp.status not in set(ok):
                text = await resp.text()
                resp.release()
                raise RuntimeError(f"{method} {url} -> {resp.status}: {text[:500]}")
            return resp
        raise AssertionError("unreachable")

    async def blob(self, blob: _Blob) -> None:
        url = f"{self.base}/v2/{self.repo}/blobs/{blob.digest}"
        head = await self.call("HEAD", url, ok=(200, 404))
        head.release()
        if head.status == 200:
            return
        post = await self.call("POST", f"{self.base}/v2/{self.repo}/blobs/uploads/", ok=(202,))
        location = post.headers["Location"]
        post.release()
        upload = URL(location)
        if not upload.is_absolute():
            upload = URL(self.base).join(upload)
        upload = upload.update_query({"digest": blob.digest})

        async def body() -> AsyncIterator[bytes]:
            for c in blob.chunks():
                yield c

        put = await self.call(
            "PUT",
            str(upload),
            ok=(201,),
            body_factory=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
        )
        put.release()

    async def manifest(self, ref: str, media_type: str, data: bytes) -> str:
        r = await self.call(
            "PUT",
            f"{self.base}/v2/{self.repo}/manifests/{ref}",
            ok=(201,),
            body_factory=lambda: data,
            headers={"Content-Type": media_type},
        )
        r.release()
        return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _descriptor(media_type: str, blob: _Blob, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": blob.digest, "size": blob.size, **extra}


async def _push_single(
    p: _Pusher, arch: str, fmt: Format, layer_sizes: Sequence[int], seed: str, ref: str | None
) -> tuple[str, int]:
    layers = [_layer(f"{seed}/{arch}/{i}", size) for i, size in enumerate(layer_sizes)]
    config = _bytes_blob(
        _canon(
            {
                "architecture": arch,
                "os": "linux",
                "created": "2026-01-01T00:00:00Z",
                "config": {"Env": ["PATH=/usr/bin"], "Labels": {"testbed.seed": seed}},
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{'0' * 64}" for _ in layers]},
            }
        )
    )
    await asyncio.gather(*(p.blob(b) for b in [config, *layers]))
    mt, cfg_t, layer_t = (
        (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER)
        if fmt == "oci"
        else (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER)
    )
    manifest = _canon(
        {
            "schemaVersion": 2,
            "mediaType": mt,
            "config": _descriptor(cfg_t, config),
            "layers": [_descriptor(layer_t, b) for b in layers],
        }
    )
    digest = await p.manifest(ref or f"sha256:{hashlib.sha256(manifest).hexdigest()}", mt, manifest)
    return digest, len(manifest)


async def _push_attestation(p: _Pusher, seed: str, subject: str) -> tuple[str, int]:
    statement = _bytes_blob(
        _canon(
            {
                "_type": "https://in-toto.io/Statement/v0.1",
                "predicateType": "https://slsa.dev/provenance/v0.2",
                "subject": [{"name": "image", "digest": {"sha256": subject.split(":", 1)[1]}}],
                "predicate": {"seed": seed},
            }
        )
    )
    config = _bytes_blob(
        _canon(
            {
                "architecture": "unknown",
                "os": "unknown",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [statement.digest]},
            }
        )
    )
    await asyncio.gather(p.blob(config), p.blob(statement))
    manifest = _canon(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": _descriptor(OCI_CONFIG, config),
            "layers": [
                _descriptor(
                    IN_TOTO,
                    statement,
                    annotations={"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"},
                )
            ],
        }
    )
    d = hashlib.sha256(manifest).hexdigest()
    await p.manifest(f"sha256:{d}", OCI_MANIFEST, manifest)
    return f"sha256:{d}", len(manifest)


async def push_image(
    registry_url: str,
    repository: str,
    tag: str,
    kind: Kind = "amd64",
    *,
    layer_sizes: Sequence[int] = (4096, 1024),
    seed: str | int = 0,
    fmt: Format = "oci",
    auth: tuple[str, str] | None = None,
    client_timeout: aiohttp.ClientTimeout = _TIMEOUT,
) -> str:
    """Push a synthetic image and return the digest the tag points at.

    amd64/arm64: one image manifest whose config blob carries architecture/os. multi: an index with
    linux/amd64, linux/arm64 and a buildx-style attestation manifest (platform unknown/unknown).
    The same seed, sizes and format always give the same digest.
    """
    seed = str(seed)
    async with aiohttp.ClientSession(timeout=client_timeout) as s:
        p = _Pusher(s, registry_url, repository, auth)
        if kind != "multi":
            digest, _ = await _push_single(p, kind, fmt, layer_sizes, seed, tag)
            return digest
        children: list[dict[str, Any]] = []
        child_t = OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST
        for arch in ("amd64", "arm64"):
            # pushed by digest first: the index must only reference manifests the registry has
            d, size = await _push_single(p, arch, fmt, layer_sizes, seed, None)
            children.append(
                {
                    "mediaType": child_t,
                    "digest": d,
                    "size": size,
                    "platform": {"architecture": arch, "os": "linux"},
                }
            )
        if fmt == "oci":
            att, att_size = await _push_attestation(p, seed, children[0]["digest"])
            children.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": att,
                    "size": att_size,
                    "platform": {"architecture": "unknown", "os": "unknown"},
                    "annotations": {
                        "vnd.docker.reference.digest": children[0]["digest"],
                        "vnd.docker.reference.type": "attestation-manifest",
                    },
                }
            )
        index_t = OCI_INDEX if fmt == "oci" else DOCKER_LIST
        index = _canon({"schemaVersion": 2, "mediaType": index_t, "manifests": children})
        return await p.manifest(tag, index_t, index)


async def _delete_tag(p: _Pusher, tag: str) -> str:
    url = f"{p.base}/v2/{p.repo}/manifests/{tag}"
    head = await p.call("HEAD", url, ok=(200,), headers={"Accept": ACCEPT})
    digest = head.headers["Docker-Content-Digest"]
    head.release()
    r = await p.call("DELETE", f"{p.base}/v2/{p.repo}/manifests/{digest}", ok=(202,))
    r.release()
    return digest


async def delete_tag(
    registry_url: str, repository: str, tag: str, *, auth: tuple[str, str] | None = None
) -> str:
    """Remove a tag (distribution deletes the manifest it points at); returns the deleted digest."""
    async with aiohttp.ClientSession(timeout=_TIMEOUT) as s:
        return await _delete_tag(_Pusher(s, registry_url, repository, auth), tag)


# ---------------------------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture
async def registries() -> AsyncIterator[Registries]:
    """Three empty registries (production, staging, poc), fresh for each test."""
    async with Registries() as regs:
        yield regs


@pytest.fixture
async def registry() -> AsyncIterator[LocalRegistry]:
    """One empty anonymous registry, fresh for each test."""
    async with LocalRegistry() as reg:
        yield reg


@pytest.fixture
async def token_server() -> AsyncIterator[TokenServer]:
    """A Docker token server accepting oauth2accesstoken with tokenauth.DEFAULT_PASSWORD."""
    from tests.testbed.tokenauth import TokenServer  # noqa: PLC0415 - tokenauth imports this module's peers

    async with TokenServer() as ts:
        yield ts


@pytest.fixture
async def token_registry(token_server: TokenServer) -> AsyncIterator[LocalRegistry]:
    """A registry that answers 401 with a Bearer challenge pointing at `token_server`."""
    async with LocalRegistry("token", token_server=token_server) as reg:
        yield reg
