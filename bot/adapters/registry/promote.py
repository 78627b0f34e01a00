"""Digest-preserving promotion: RegistryClient copies an image with all its platforms between registries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from yarl import URL

from bot.adapters.registry.client import INDEX_TYPES, BaseClient, _Manifest, _Repo
from bot.adapters.registry.wire import _error_text, _Retryable
from bot.errors import PermanentError

# the name the one-module client logged under, kept for whoever filters on it
log = logging.getLogger("bot.adapters.registry")

CHUNK = 256 * 1024


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


class RegistryClient(BaseClient):
    """Async OCI distribution client. Use as `async with RegistryClient() as rc:`.

    Tag checks, timeouts and retries are BaseClient's (client.py); this adds promotion.
    """

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
            r = await self._repo_request(
                "PUT",
                repo,
                f"manifests/{ref}",
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
            r = await self._repo_request(
                "HEAD",
                repo,
                f"blobs/{digest}",
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
            path = "blobs/uploads/"
            if same_host:
                path += f"?mount={digest}&from={src.name}"
            r = await self._repo_request(
                "POST",
                dst,
                path,
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
        get = await self._repo_request(
            "GET",
            src,
            f"blobs/{digest}",
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
            async with put:
                if put.status != 201:
                    text = await put.read()
                    if source_failure:
                        raise _Retryable(src.host, f"reading blob {digest} failed after {sent} bytes")
                    raise PermanentError(
                        f"registry {dst.host} refused blob {digest} for {dst.name} (HTTP {put.status}: {_error_text(text)})"
                    )
        return size
