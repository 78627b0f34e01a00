"""Fake Kubernetes API server: serves one Store over real HTTP the way kubernetes_asyncio expects."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tests.testbed.kube.store import RESOURCES, ResourceInfo, Store, StoreError, not_found

__all__ = ["FakeKubeAPI", "TokenCheck", "mint_token"]

TOKEN_PREFIX = "fake"


def mint_token(secret: str, lifetime: float, *, now: float | None = None) -> tuple[str, int]:
    """A token `fake.<expiry_unix>.<hmac>` and its expiry, as the fake gke-gcloud-auth-plugin prints it."""
    expiry = int((time.time() if now is None else now) + lifetime)
    payload = f"{TOKEN_PREFIX}.{expiry}"
    sig = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
    return f"{payload}.{sig}", expiry


class TokenCheck:
    """Bearer-token verification: HMAC-signed expiring tokens from the fake exec plugin, or fixed tokens."""

    def __init__(
        self,
        secret: str | None = None,
        *,
        static_tokens: tuple[str, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret
        self.static_tokens = frozenset(static_tokens)
        self.clock = clock

    def problem(self, authorization: str | None) -> str | None:
        """None when the header carries a valid token, else why not (for the server's log, never the token)."""
        if not authorization or not authorization.startswith("Bearer "):
            return "no bearer token"
        token = authorization[len("Bearer ") :].strip()
        if token in self.static_tokens:
            return None
        parts = token.split(".")
        if self.secret is None or len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1].isdigit():
            return "token not recognised"
        expected = hmac.new(
            self.secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected, parts[2]):
            return "bad token signature"
        if int(parts[1]) <= self.clock():
            return "token expired"
        return None


_BY_GROUP_VERSION: dict[tuple[str, str, str], ResourceInfo] = {
    (info.group, info.version, info.plural): info for info in RESOURCES.values()
}
_JSON = "application/json"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=_dumps(obj), status=status, content_type=_JSON)


def _status_response(err: StoreError) -> web.Response:
    return _json_response(err.status(), err.code)


def _flag(value: str | None) -> bool:
    # kubernetes_asyncio sends Python booleans as "True"/"False"; kubectl sends "true".
    return value is not None and value.lower() in ("true", "1")


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise StoreError(400, "BadRequest", f"{name} must be an integer, got {raw!r}") from None


class FakeKubeAPI:
    """One fake cluster's API server on 127.0.0.1 and a free port; `url` is valid after `start()`."""

    def __init__(
        self,
        store: Store,
        *,
        tokens: TokenCheck | None = None,
        host: str = "127.0.0.1",
        latency: float = 0.0,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.host = host
        # Seconds slept before handling each request, so a benchmark sees a remote cluster's round trip;
        # settable while running.
        self.latency = latency
        self.port = 0
        self.requests = 0  # how many requests were served (tests assert on it; a counter, never a log)
        self.unauthorized = 0
        self._runner: web.AppRunner | None = None
        self._watches: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeKubeAPI.url is only known after start()")
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        r = app.router
        for slash in ("", "/"):  # kubernetes_asyncio's VersionApi asks for /version/
            r.add_get("/version" + slash, self._version)
            r.add_get("/api" + slash, self._api_versions)
            r.add_get("/apis" + slash, self._api_groups)
            r.add_get("/api/v1" + slash, self._core_resources)
            r.add_get("/apis/{group}/{version}" + slash, self._group_resources)
        for prefix in ("/api/{version:v1}", "/apis/{group}/{version}"):
            r.add_get(prefix + "/{plural}", self._collection)
            r.add_route("*", prefix + "/namespaces/{namespace}/{plural}", self._collection)
            r.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}", self._item)
            r.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}/{sub}", self._item)
        # Without handler cancellation, a watch whose client went away would wait for its next event forever.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for task in list(self._watches):
            task.cancel()
        if self._watches:
            await asyncio.wait(list(self._watches), timeout=2)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeKubeAPI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- plumbing ----------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.requests += 1
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if self.tokens is not None and self.tokens.problem(request.headers.get("Authorization")) is not None:
            self.unauthorized += 1
            return _status_response(StoreError(401, "Unauthorized", "Unauthorized"))
        try:
            return await handler(request)
        except StoreError as err:
            return _status_response(err)
        except web.HTTPNotFound:
            return _status_response(
                StoreError(
                    404, "NotFound", f"the server could not find the requested resource ({request.path})"
                )
            )
        except web.HTTPMethodNotAllowed:
            return _status_response(
                StoreError(
                    405,
                    "MethodNotAllowed",
                    f"the server does not allow this method on the requested resource ({request.method})",
                )
            )

    @staticmethod
    def _resolve(request: web.Request) -> ResourceInfo:
        group = request.match_info.get("group", "")
        version = request.match_info["version"]
        plural = request.match_info["plural"]
        info = _BY_GROUP_VERSION.get((group, version, plural))
        if info is None:
            raise StoreError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        return info

    @staticmethod
    async def _body(request: web.Request) -> Any:
        try:
            return json.loads(await request.read() or b"null")
        except ValueError as exc:
            raise StoreError(400, "BadRequest", f"the request body is not valid JSON: {exc}") from None

    # -- discovery ---------------------------------------------------------------------------------------

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.0-fake",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        )

    async def _api_versions(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self.port}"}
                ],
            }
        )

    async def _api_groups(self, request: web.Request) -> web.Response:
        groups = sorted({(i.group, i.version) for i in RESOURCES.values() if i.group})
        return _json_response(
            {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": g,
                        "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                        "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v},
                    }
                    for g, v in groups
                ],
            }
        )

    @staticmethod
    def _resource_list(group: str, version: str) -> dict[str, Any]:
        resources: list[dict[str, Any]] = []
        for info in RESOURCES.values():
            if (info.group, info.version) != (group, version):
                continue
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            resources.append(
                {
                    "name": info.plural,
                    "singularName": info.kind.lower(),
                    "namespaced": True,
                    "kind": info.kind,
                    "verbs": verbs,
                }
            )
            if info.has_status:
                resources.append(
                    {
                        "name": f"{info.plural}/status",
                        "singularName": "",
                        "namespaced": True,
                        "kind": info.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
            if info.plural == "pods":
                resources.append(
                    {
                        "name": "pods/log",
                        "singularName": "",
                        "namespaced": True,
                        "kind": "Pod",
                        "verbs": ["get"],
                    }
                )
        if not resources:
            raise StoreError(
                404, "NotFound", f"the server could not find the requested resource ({group}/{version})"
            )
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    async def _core_resources(self, request: web.Request) -> web.Response:
        return _json_response(self._resource_list("", "v1"))

    async def _group_resources(self, request: web.Request) -> web.Response:
        return _json_response(self._resource_list(request.match_info["group"], request.match_info["version"]))

    # -- collections -------------------------------------------------------------------------------------

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        info = self._resolve(request)
        namespace = request.match_info.get("namespace")
        if request.method == "GET":
            if _flag(request.query.get("watch")):
                return await self._watch(request, info, namespace)
            items, rv = self.store.list(
                info.plural,
                namespace,
                label_selector=request.query.get("labelSelector"),
                field_selector=request.query.get("fieldSelector"),
            )
            return _json_response(
                {
                    "kind": f"{info.kind}List",
                    "apiVersion": info.api_version,
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }
            )
        if request.method == "POST" and namespace is not None:
            body = await self._body(request)
            if not isinstance(body, dict):
                raise StoreError(400, "BadRequest", "the request body must be a JSON object")
            meta = body.setdefault("metadata", {})
            if meta.get("namespace") not in (None, "", namespace):
                raise StoreError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = namespace
            if info.has_status:
                # Clients cannot create status (the real create strategies reset it); the in-process
                # controller may, through Store.create directly.
                body.pop("status", None)
                if info.plural == "pods":
                    body["status"] = {"phase": "Pending"}
            if _flag(request.query.get("dryRun")) or request.query.get("dryRun") == "All":
                raise StoreError(400, "BadRequest", "dryRun is not supported by the fake API server")
            return _json_response(self.store.create(info.plural, body), 201)
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])

    async def _watch(
        self, request: web.Request, info: ResourceInfo, namespace: str | None
    ) -> web.StreamResponse:
        timeout = _int_param(request, "timeoutSeconds")
        rv = request.query.get("resourceVersion")
        label_selector = request.query.get("labelSelector")
        field_selector = request.query.get("fieldSelector")
        response = web.StreamResponse(status=200, headers={"Content-Type": _JSON})
        response.enable_chunked_encoding()
        try:
            self.store.check_watch_start(info.plural, rv)
            stream = self.store.watch(
                info.plural,
                namespace,
                resource_version=rv,
                label_selector=label_selector,
                field_selector=field_selector,
            )
        except StoreError as err:
            if err.code != 410:
                raise
            # Like the real server: the stream opens, carries one ERROR event with the Status, and ends.
            await response.prepare(request)
            await response.write((_dumps({"type": "ERROR", "object": err.status()}) + "\n").encode())
            await response.write_eof()
            return response
        await response.prepare(request)
        task = asyncio.current_task()
        assert task is not None
        self._watches.add(task)
        try:
            async with asyncio.timeout(timeout):
                async for event_type, obj in stream:
                    await response.write((_dumps({"type": event_type, "object": obj}) + "\n").encode())
        except TimeoutError:
            pass  # timeoutSeconds elapsed: end the stream cleanly so the client sees EOF
        except ConnectionResetError:
            return response  # the client went away
        finally:
            self._watches.discard(task)
            await stream.aclose()
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    # -- single objects ----------------------------------------------------------------------------------

    async def _item(self, request: web.Request) -> web.StreamResponse:
        info = self._resolve(request)
        namespace = request.match_info["namespace"]
        name = request.match_info["name"]
        sub = request.match_info.get("sub")
        if sub == "log" and info.plural == "pods" and request.method == "GET":
            return await self._log(request, namespace, name)
        if sub not in (None, "status") or (sub == "status" and not info.has_status):
            raise StoreError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        method = request.method
        if method == "GET":
            obj = self.store.get(info.plural, namespace, name)
            if obj is None:
                raise not_found(info, name)
            return _json_response(obj)
        if method == "PUT":
            body = await self._body(request)
            if not isinstance(body, dict):
                raise StoreError(400, "BadRequest", "the request body must be a JSON object")
            meta = body.setdefault("metadata", {})
            if meta.get("name", name) != name:
                raise StoreError(
                    400,
                    "BadRequest",
                    f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})",
                )
            meta.update(name=name, namespace=meta.get("namespace") or namespace)
            if meta["namespace"] != namespace:
                raise StoreError(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            return _json_response(self.store.replace(info.plural, body, subresource=sub))
        if method == "PATCH":
            body = await self._body(request)
            content_type = request.headers.get("Content-Type", "")
            return _json_response(
                self.store.patch(info.plural, namespace, name, body, content_type, subresource=sub)
            )
        if method == "DELETE" and sub is None:
            return await self._delete(request, info, namespace, name)
        raise web.HTTPMethodNotAllowed(method, ["GET", "PUT", "PATCH", "DELETE"])

    async def _delete(
        self, request: web.Request, info: ResourceInfo, namespace: str, name: str
    ) -> web.Response:
        options = await self._body(request) if request.can_read_body else None
        options = options if isinstance(options, dict) else {}
        policy = request.query.get("propagationPolicy") or options.get("propagationPolicy")
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise StoreError(
                400,
                "BadRequest",
                f"propagationPolicy {policy!r} is not one of Orphan, Background, Foreground",
            )
        if options.get("orphanDependents") is True and policy is None:
            policy = "Orphan"
        pre = options.get("preconditions") or {}
        if pre:
            current = self.store.get(info.plural, namespace, name)
            if current is not None and any(
                pre.get(k) not in (None, current["metadata"].get(k)) for k in ("uid", "resourceVersion")
            ):
                raise StoreError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {info.plural} "{name}": the precondition (uid/resourceVersion) does not match',
                )
        gone = self.store.delete(info.plural, namespace, name, propagation_policy=policy)
        # Pods and custom resources answer with the deleted object, the other built-ins with a Status.
        if info.custom or info.plural == "pods":
            return _json_response(gone)
        return _json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": name,
                    "group": info.group,
                    "kind": info.plural,
                    "uid": gone["metadata"]["uid"],
                },
            }
        )

    async def _log(self, request: web.Request, namespace: str, pod: str) -> web.StreamResponse:
        container = request.query.get("container") or None
        previous = _flag(request.query.get("previous"))
        tail = _int_param(request, "tailLines")
        text = self.store.get_log(namespace, pod, container, previous=previous, tail_lines=tail)
        if not _flag(request.query.get("follow")) or previous:
            return web.Response(text=text, content_type="text/plain")
        return await self._follow_log(request, namespace, pod, container, text)

    async def _follow_log(
        self, request: web.Request, namespace: str, pod: str, container: str | None, text: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(text.encode())
        sent = len(self.store.get_log(namespace, pod, container))
        task = asyncio.current_task()
        assert task is not None
        self._watches.add(task)
        try:
            # The log buffer has no change feed; polling a dict lookup is cheap and keeps the Store simple.
            while True:
                pod_obj = self.store.get("pods", namespace, pod)
                if pod_obj is None:
                    break
                try:
                    full = self.store.get_log(namespace, pod, container)
                except StoreError:
                    break
                if len(full) > sent:
                    await response.write(full[sent:].encode())
                    sent = len(full)
                elif _terminated(pod_obj, container):
                    break
                await asyncio.sleep(0.05)
            await response.write_eof()
        except ConnectionResetError:
            pass
        finally:
            self._watches.discard(task)
        return response


def _terminated(pod: dict[str, Any], container: str | None) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if container is None or status.get("name") == container:
            return bool((status.get("state") or {}).get("terminated"))
    return False
