"""Kubernetes clients, one per kubeconfig context, speaking raw JSON with timeouts, token refresh and watches.

Clients are lazy: reading the kubeconfig runs no credential plugin; a context's client is built when it is
first asked for, and its token fetched on its first request. Exec credential plugins (gke-gcloud-auth-plugin
on GKE Connect Gateway) are run by `bot.adapters.kubeauth`, not by kubernetes_asyncio, through one in-memory cache per
process: the ExecCredential's token is reused by every context with the same plugin stanza until
status.expirationTimestamp. Each client tracks that expiry, takes a fresh token under a lock shortly before
it (through the configuration's refresh hook, consulted on every request), and retries a request once after
a forced refresh when the API server answers 401.

Responses are read as plain dicts (``_preload_content=False``): the bot reads a handful of fields and must not
depend on the generated models accepting every object a server returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import incluster_config, kube_config
from kubernetes_asyncio.config.config_exception import ConfigException

# the credential plugin and its per-process token cache live in kubeauth (split out to keep this module small)
from bot.adapters.kubeauth import _BODY_LIMIT, EXEC_CREDENTIALS, ExecCredentialCache, _now
from bot.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"

# Refresh this long before the plugin's token expires, so a request never leaves with a token that dies in flight.
_REFRESH_MARGIN = dt.timedelta(seconds=30)


class KubeNotFound(PermanentError):
    """The object does not exist (404)."""


class KubeConflict(PermanentError):
    """The object exists already or was changed concurrently (409)."""


class KubeGone(TransientError):
    """A watch's resourceVersion is too old (410): re-list and watch again."""


def _status_message(body: bytes | str | None) -> str:
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return text[:_BODY_LIMIT]
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])[:_BODY_LIMIT]
    return text[:_BODY_LIMIT]


@dataclass
class _Auth:
    """How a client gets its Authorization header, and again when it expires."""

    exec_config: Mapping[str, Any]
    expiry: dt.datetime | None = None
    loaded: bool = False
    refreshes: int = 0
    cache: ExecCredentialCache = EXEC_CREDENTIALS


class ClusterClient:
    """One cluster (kubeconfig context): typed API groups plus helpers returning raw JSON."""

    def __init__(
        self,
        context: str,
        api_client: k8s.ApiClient,
        *,
        auth: _Auth | None,
        timeout: float,
        exec_timeout: float = 30.0,
        refresh_margin: float = _REFRESH_MARGIN.total_seconds(),
    ) -> None:
        self.context = context
        self.refresh_margin = dt.timedelta(seconds=refresh_margin)
        self.api_client = api_client
        self.timeout = timeout
        self._auth = auth
        self._exec_timeout = exec_timeout
        self._lock = asyncio.Lock()
        self.core = k8s.CoreV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.batch = k8s.BatchV1Api(api_client)
        self.custom = k8s.CustomObjectsApi(api_client)
        if auth is not None:
            api_client.configuration.refresh_api_key_hook = self._refresh_hook

    # ---- credentials -------------------------------------------------------------------------------

    @property
    def token_refreshes(self) -> int:
        return self._auth.refreshes if self._auth else 0

    async def _refresh_hook(self, _configuration: k8s.Configuration) -> None:
        auth = self._auth
        if auth is None:
            return
        if not auth.loaded:
            await self.refresh_token(initial=True)
        elif auth.expiry is not None and _now() >= auth.expiry - self.refresh_margin:
            await self.refresh_token(stale=auth.expiry)

    async def refresh_token(
        self, *, stale: dt.datetime | None = None, rejected: str | None = None, initial: bool = False
    ) -> None:
        """Get this context's token from the exec-credential cache (running the plugin when it has none).

        `initial` is the client's first request: the plugin runs only now, and only if no other context with
        the same plugin got an unexpired token already.

        `stale` is the expiry the caller saw, `rejected` the header the server refused (401): concurrent callers
        wait on the lock and reuse the first refresh instead of each running the plugin.
        """
        auth = self._auth
        if auth is None:
            return
        async with self._lock:
            first = not auth.loaded
            if initial and not first:
                return
            if not first and stale is not None and auth.expiry is not None and auth.expiry > stale:
                return  # another request refreshed it while we waited
            current = self.api_client.configuration.api_key.get("BearerToken")
            if rejected is not None and current != rejected:
                return  # the refused token was already replaced
            credential = await auth.cache.get(
                auth.exec_config,
                context=self.context,
                margin=self.refresh_margin,
                plugin_limit=self._exec_timeout,
                rejected=rejected,
            )
            self.api_client.configuration.api_key["BearerToken"] = credential.header
            auth.expiry = credential.expiry
            if not first:
                auth.refreshes += 1
                log.info("refreshed the token for context %s (refresh #%d)", self.context, auth.refreshes)
            auth.loaded = True

    # ---- requests ----------------------------------------------------------------------------------

    def _translate(self, e: ApiException, what: str) -> Exception:
        msg = _status_message(e.body) or (e.reason or "")
        where = f"cluster {self.context}"
        if e.status == 404:
            return KubeNotFound(f"{what}: not found in {where} ({msg})")
        if e.status == 409:
            return KubeConflict(f"{what}: conflict in {where}: {msg}")
        if e.status == 410:
            return KubeGone(f"{what}: watch expired in {where}: {msg}")
        if e.status == 401:
            return PermanentError(
                f"{where} rejected the bot's credentials (401) for {what}: {msg}",
                hint="The access token was refused even after a refresh: check the gcloud account used by "
                "gke-gcloud-auth-plugin.",
            )
        if e.status == 403:
            return PermanentError(
                f"{where} forbids {what} (403): {msg}",
                hint="Grant the bot's identity the needed RBAC role in that cluster.",
            )
        if e.status in (429, 500, 502, 503, 504) or e.status == 0:
            return TransientError(f"{where} is busy or failing ({e.status}) for {what}: {msg}")
        return PermanentError(f"{where} refused {what} ({e.status}): {msg}")

    async def _send(
        self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> aiohttp.ClientResponse:
        kwargs = {"_request_timeout": self.timeout, **kwargs, "_preload_content": False}
        resp: aiohttp.ClientResponse = await fn(*args, **kwargs)
        if resp.status >= 400:
            body = await resp.read()
            resp.release()
            exc = ApiException(status=resp.status, reason=resp.reason or "")
            exc.body = body
            raise exc
        return resp

    async def _open(
        self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> aiohttp.ClientResponse:
        """Send one request; on 401 refresh the token and retry once; translate failures."""
        if self._auth is not None and not self._auth.loaded:
            await self.refresh_token(initial=True)  # so `sent` below is the header this request carries
        for attempt in (1, 2):
            sent = self.api_client.configuration.api_key.get("BearerToken")
            try:
                return await self._send(fn, args, dict(kwargs))
            except ApiException as e:
                if e.status == 401 and attempt == 1 and self._auth is not None:
                    log.info("401 from %s for %s: refreshing the token and retrying once", self.context, what)
                    await self.refresh_token(rejected=sent)
                    continue
                raise self._translate(e, what) from None
            except (TimeoutError, aiohttp.ClientError) as e:
                raise TransientError(
                    f"cluster {self.context} unreachable for {what}: {type(e).__name__} {e}".rstrip(),
                    hint="Retry shortly; if it persists check the Connect Gateway and the network.",
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def read_deployment(self, namespace: str, name: str) -> JSON:
        """The Deployment as the API server has it; KubeNotFound when there is none."""
        return await self.call(
            f"deployment {namespace}/{name}", self.apps.read_namespaced_deployment, name, namespace
        )

    async def call(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> JSON:
        """Call a typed API method and return the response body as a dict."""
        resp = await self._open(what, fn, *args, **kwargs)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for drops a cancellation that arrives as the
            # read completes (CPython gh-86296), which left cancelled watch tasks running and a deploy hung.
            async with asyncio.timeout(self.timeout):
                data = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise TransientError(f"cluster {self.context} dropped the answer to {what}: {e}") from None
        finally:
            resp.release()
        try:
            out = json.loads(data) if data else {}
        except ValueError:
            raise TransientError(f"cluster {self.context} sent a non-JSON answer to {what}") from None
        return out if isinstance(out, dict) else {"value": out}

    async def text(self, what: str, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> str:
        """Call a method that answers text/plain (pod logs)."""
        resp = await self._open(what, fn, *args, **kwargs)
        try:
            async with asyncio.timeout(self.timeout):  # not wait_for: see call()
                data = await resp.read()
        finally:
            resp.release()
        return data.decode("utf-8", "replace")

    async def watch(
        self,
        what: str,
        list_fn: Callable[..., Awaitable[Any]],
        *args: Any,
        server_timeout: int = 60,
        **kwargs: Any,
    ) -> AsyncGenerator[tuple[str, JSON]]:
        """List, then watch from the list's resourceVersion, forever.

        The initial list is replayed as ADDED events, so a caller sees the current state first. A stream that
        ends (server timeout, dropped connection) is reopened from the last resourceVersion seen; a 410 Gone
        (history expired) re-lists and replays the state as ADDED. The caller stops by leaving the loop.
        """
        rv: str | None = None
        while True:
            if rv is None:
                listing = await self.call(what, list_fn, *args, **kwargs)
                rv = str((listing.get("metadata") or {}).get("resourceVersion") or "")
                for item in listing.get("items") or []:
                    yield "ADDED", item
            try:
                resp = await self._open(
                    what,
                    list_fn,
                    *args,
                    watch=True,
                    resource_version=rv,
                    timeout_seconds=server_timeout,
                    allow_watch_bookmarks=True,
                    _request_timeout=aiohttp.ClientTimeout(
                        total=None, sock_connect=self.timeout, sock_read=server_timeout + self.timeout
                    ),
                    **kwargs,
                )
            except KubeGone:
                rv = None
                continue
            except TransientError as e:
                log.warning("watch of %s on %s failed to open (%s); retrying", what, self.context, e)
                await asyncio.sleep(0.5)
                continue
            try:
                async for kind, obj in _watch_lines(resp):
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            rv = None
                            break
                        raise self._translate(
                            ApiException(status=int(obj.get("code") or 500), reason=str(obj.get("reason"))),
                            what,
                        )
                    new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if new_rv:
                        rv = str(new_rv)
                    if kind == "BOOKMARK":
                        continue
                    yield kind, obj
            except (TimeoutError, aiohttp.ClientError) as e:
                log.info("watch of %s on %s dropped (%s); reconnecting", what, self.context, type(e).__name__)
            finally:
                # close, not release: an unfinished stream must not go back to the connection pool
                resp.close()

    async def close(self) -> None:
        await self.api_client.close()


async def _watch_lines(resp: aiohttp.ClientResponse) -> AsyncGenerator[tuple[str, JSON]]:
    while True:
        line = await resp.content.readline()
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            log.warning("ignoring a malformed watch line (%d bytes)", len(line))
            continue
        obj = event.get("object")
        if isinstance(event, dict) and isinstance(obj, dict):
            yield str(event.get("type", "")), obj


def _read_kubeconfig(path: Path | None) -> tuple[Any, dict[str, Mapping[str, Any]]]:
    """The kubeconfig (KUBECONFIG's files merged, as kubectl does) with every user's `exec` taken out and
    returned by user name: the plugin is run by the credential cache on a client's first request, not here."""
    merger = kube_config.KubeConfigMerger(str(path) if path else kube_config.KUBE_CONFIG_DEFAULT_LOCATION)
    merged = merger.config
    if merged is None:
        raise ConfigException(f"no kubeconfig found at {path or kube_config.KUBE_CONFIG_DEFAULT_LOCATION}")
    execs: dict[str, Mapping[str, Any]] = {}
    for node in merged.value.get("users") or []:
        entry = node.value if hasattr(node, "value") else node
        user = entry.get("user") if isinstance(entry, dict) else None
        if isinstance(user, dict) and isinstance(user.get("exec"), dict):
            execs[str(entry.get("name"))] = user.pop("exec")
    return merged, execs


def _context_user(merged: Any, context: str) -> str | None:
    for node in merged.value.get("contexts") or []:
        entry = node.value if hasattr(node, "value") else node
        if isinstance(entry, dict) and entry.get("name") == context:
            user = (entry.get("context") or {}).get("user")
            return str(user) if user is not None else None
    return None


@dataclass
class _Pending:
    """A context whose configuration is read and whose client is built on first use."""

    configuration: k8s.Configuration
    exec_config: Mapping[str, Any] | None


class KubeClients:
    """The clusters the bot talks to, by kubeconfig context name; build with ``from_kubeconfig``."""

    def __init__(
        self,
        clients: Mapping[str, ClusterClient],
        *,
        pending: Mapping[str, _Pending] | None = None,
        request_timeout: float = 15.0,
        exec_timeout: float = 30.0,
        refresh_margin: float = _REFRESH_MARGIN.total_seconds(),
    ) -> None:
        self._clients = dict(clients)
        self._pending = dict(pending or {})
        self._order = list(dict.fromkeys([*self._clients, *self._pending]))
        self._request_timeout = request_timeout
        self._exec_timeout = exec_timeout
        self._refresh_margin = refresh_margin

    @classmethod
    async def from_kubeconfig(
        cls,
        path: Path | None,
        contexts: Iterable[str],
        *,
        request_timeout: float = 15.0,
        exec_timeout: float = 30.0,
        refresh_margin: float = _REFRESH_MARGIN.total_seconds(),
    ) -> KubeClients:
        """Read the kubeconfig; a context missing from it is a configuration error.

        Nothing is connected and no credential plugin runs here: a context's client is built the first time
        it is asked for, and its token fetched on its first request (through the process's credential cache).
        A command that needs no cluster (`history`) pays for none of it.
        """
        where = path or kube_config.KUBE_CONFIG_DEFAULT_LOCATION
        try:
            merged, execs = await asyncio.to_thread(_read_kubeconfig, path)
        except (ConfigException, OSError, ValueError) as e:
            raise PermanentError(
                f"cannot read the kubeconfig {where}: {e or type(e).__name__}",
                hint="Point KUBECONFIG at the file `gcloud container fleet memberships get-credentials` wrote.",
            ) from None
        pending: dict[str, _Pending] = {}
        for context in dict.fromkeys(contexts):
            configuration = k8s.Configuration()
            try:
                # host, TLS and any static token; the exec entries were taken out, so no plugin runs
                loader = kube_config.KubeConfigLoader(
                    config_dict=merged, active_context=context, config_base_path=None
                )
                await loader.load_and_set(configuration)
            except (ConfigException, OSError, KeyError, AssertionError, TypeError) as e:
                raise PermanentError(
                    f"cannot load kube context {context} from {where}: {e or type(e).__name__}",
                    hint="Add the context to the kubeconfig (gcloud container fleet memberships get-credentials …).",
                ) from None
            user = _context_user(merged, context)
            pending[context] = _Pending(configuration, execs.get(user) if user is not None else None)
        return cls(
            {},
            pending=pending,
            request_timeout=request_timeout,
            exec_timeout=exec_timeout,
            refresh_margin=refresh_margin,
        )

    @classmethod
    def in_cluster(cls, context: str, *, timeout: float = 15.0) -> KubeClients:
        """Running in a pod: the service-account client serves the one context that names this cluster.

        The library's in-cluster loader re-reads the rotating service-account token by itself.
        """
        configuration = k8s.Configuration()
        try:
            # the library leaves this loader unannotated
            incluster_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except ConfigException as e:
            raise PermanentError(f"not running in a Kubernetes pod: {e}") from None
        api = k8s.ApiClient(configuration=configuration)
        return cls({context: ClusterClient(context, api, auth=None, timeout=timeout)})

    def __getitem__(self, context: str) -> ClusterClient:
        client = self._clients.get(context)
        if client is not None:
            return client
        pending = self._pending.pop(context, None)
        if pending is None:
            raise PermanentError(
                f"no Kubernetes client for context {context}",
                hint="Add the context to the kubeconfig given to the bot.",
            )
        exec_config = pending.exec_config
        client = self._clients[context] = ClusterClient(
            context,
            k8s.ApiClient(configuration=pending.configuration),
            auth=_Auth(exec_config) if exec_config is not None else None,
            timeout=self._request_timeout,
            exec_timeout=self._exec_timeout,
            refresh_margin=self._refresh_margin,
        )
        return client

    def __contains__(self, context: object) -> bool:
        return context in self._clients or context in self._pending

    @property
    def contexts(self) -> list[str]:
        return list(self._order)

    @property
    def built(self) -> list[str]:
        """The contexts a client was made for so far (the others cost nothing yet)."""
        return list(self._clients)

    async def close(self) -> None:
        for c in self._clients.values():
            with contextlib.suppress(Exception):
                await c.close()

    async def __aenter__(self) -> KubeClients:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
