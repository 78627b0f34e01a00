"""Fake Kubernetes API server: serves one Store over real HTTP the way kubernetes_asyncio expects."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import yaml
from aiohttp import web

from tests.testbed.kube import admission, openapi
from tests.testbed.kube.printers import table, wants_table
from tests.testbed.kube.protobuf import decode_self_subject_access_review
from tests.testbed.kube.store import RESOURCES, ResourceInfo, Store, StoreError, not_found
from tests.testbed.kube.tls import sandbox_ca

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


def _dry_run(request: web.Request) -> bool:
    value = request.query.get("dryRun")
    if value is None:
        return False
    if value != "All":
        raise StoreError(400, "BadRequest", f"Invalid dry run value: {value!r}: supported values: All")
    return True


def _strict(request: web.Request) -> bool:
    return request.query.get("fieldValidation", "") == "Strict"


def _selector_text(selector: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items()))


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
        tls: bool = False,
        prefix: str = "",
    ) -> None:
        """`tls` serves https with the test bed's CA; `prefix` is a path every API path sits under, as
        GKE Connect Gateway's `/v1/projects/<number>/locations/<location>/gkeMemberships/<membership>`."""
        self.store = store
        self.tls = tls
        self.prefix = prefix.rstrip("/")
        self.tokens = tokens
        self.host = host
        # Seconds slept before handling each request, so a benchmark sees a remote cluster's round trip;
        # settable while running.
        self.latency = latency
        self.port = 0
        # a watch that asked for bookmarks gets one after this many quiet seconds (the watch cache's
        # are about a minute apart; shorter here so short watches see them)
        self.bookmark_interval = 5.0
        self.requests = 0  # how many requests were served (tests assert on it; a counter, never a log)
        self.unauthorized = 0
        self._runner: web.AppRunner | None = None
        self._watches: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("FakeKubeAPI.url is only known after start()")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}{self.prefix}"

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        r = app.router
        p = self.prefix
        for slash in ("", "/"):  # kubernetes_asyncio's VersionApi asks for /version/
            r.add_get(p + "/version" + slash, self._version)
            r.add_get(p + "/api" + slash, self._api_versions)
            r.add_get(p + "/apis" + slash, self._api_groups)
            r.add_get(p + "/api/v1" + slash, self._core_resources)
            r.add_get(p + "/apis/{group}/{version}" + slash, self._group_resources)
        for probe in ("/readyz", "/livez", "/healthz"):
            r.add_get(p + probe, self._probe)
        r.add_post(
            p + "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", self._self_subject_access_review
        )
        r.add_get(p + "/openapi/v3", self._openapi_index)
        r.add_get(p + "/openapi/v3/{gv:.+}", self._openapi_group_version)
        r.add_get(p + "/openapi/v2", self._openapi_v2)
        for prefix in (p + "/api/{version:v1}", p + "/apis/{group}/{version}"):
            r.add_route("*", prefix + "/{plural}", self._collection)
            r.add_route("*", prefix + "/namespaces/{namespace}/{plural}", self._collection)
            r.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}", self._item)
            r.add_route("*", prefix + "/namespaces/{namespace}/{plural}/{name}/{sub}", self._item)
            # cluster-scoped objects (namespaces, nodes)
            r.add_route("*", prefix + "/{plural}/{name}", self._item)
            r.add_route("*", prefix + "/{plural}/{name}/{sub}", self._item)
        # Without handler cancellation, a watch whose client went away would wait for its next event forever.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        ssl_context = sandbox_ca().server_context() if self.tls else None
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=ssl_context)
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
        ctype = request.headers.get("Content-Type", "")
        if "protobuf" in ctype:
            # as a server without the protobuf codec answers (an aggregated API, a CRD): clients
            # (client-go >= 1.31) retry the request as JSON
            raise StoreError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f"application/json, application/yaml (got {ctype})",
            )
        if "yaml" in ctype and "apply-patch" not in ctype:
            try:
                return yaml.safe_load(await request.read() or b"null")
            except yaml.YAMLError as exc:
                raise StoreError(400, "BadRequest", f"the request body is not valid YAML: {exc}") from None
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
        groups.append(("authorization.k8s.io", "v1"))
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
        if (group, version) == ("authorization.k8s.io", "v1"):
            resources.append(
                {
                    "name": "selfsubjectaccessreviews",
                    "singularName": "selfsubjectaccessreview",
                    "namespaced": False,
                    "kind": "SelfSubjectAccessReview",
                    "verbs": ["create"],
                }
            )
        for info in RESOURCES.values():
            if (info.group, info.version) != (group, version):
                continue
            entry: dict[str, Any] = {
                "name": info.plural,
                "singularName": info.kind.lower(),
                "namespaced": info.namespaced,
                "kind": info.kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            }
            if info.short_names:
                entry["shortNames"] = list(info.short_names)
            if info.categories:
                entry["categories"] = list(info.categories)
            resources.append(entry)
            subresources = []
            if info.has_status:
                subresources.append(("status", info.kind, ["get", "patch", "update"], None))
            if info.plural in ("deployments", "replicasets"):
                subresources.append(("scale", "Scale", ["get", "patch", "update"], "autoscaling"))
            if info.plural == "pods":
                subresources.append(("log", "Pod", ["get"], None))
            for sub, kind, verbs, sub_group in subresources:
                item: dict[str, Any] = {
                    "name": f"{info.plural}/{sub}",
                    "singularName": "",
                    "namespaced": info.namespaced,
                    "kind": kind,
                    "verbs": verbs,
                }
                if sub_group:
                    item.update(group=sub_group, version="v1")
                resources.append(item)
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

    async def _probe(self, request: web.Request) -> web.Response:
        return web.Response(text="ok", content_type="text/plain")

    async def _self_subject_access_review(self, request: web.Request) -> web.Response:
        """`kubectl auth can-i`: the gateway's identity may do everything here (the bot's RBAC on GKE)."""
        if "protobuf" in request.headers.get("Content-Type", ""):
            try:
                body: Any = decode_self_subject_access_review(await request.read())
            except (ValueError, IndexError, KeyError) as exc:
                raise StoreError(400, "BadRequest", f"cannot decode the protobuf body: {exc}") from None
        else:
            body = await self._body(request)
        if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
            raise StoreError(400, "BadRequest", "a SelfSubjectAccessReview needs a spec")
        return _json_response(
            {
                "kind": "SelfSubjectAccessReview",
                "apiVersion": "authorization.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "spec": body["spec"],
                "status": {"allowed": True, "reason": "the test bed grants every verb"},
            },
            201,
        )

    # -- OpenAPI -----------------------------------------------------------------------------------------

    async def _openapi_index(self, request: web.Request) -> web.Response:
        return _json_response(openapi.index(self.prefix))

    async def _openapi_group_version(self, request: web.Request) -> web.Response:
        doc = openapi.document(request.match_info["gv"])
        if doc is None:
            raise web.HTTPNotFound()
        return _json_response(doc)

    async def _openapi_v2(self, request: web.Request) -> web.Response:
        # Clients use v3 when the server publishes it; v2 (protobuf) is not served, as on servers that disable it.
        raise web.HTTPNotFound()

    # -- collections -------------------------------------------------------------------------------------

    def _check_scope(self, request: web.Request, info: ResourceInfo, *, item: bool) -> str | None:
        namespace = request.match_info.get("namespace")
        if namespace is not None and not info.namespaced:
            raise web.HTTPNotFound()
        if namespace is None and info.namespaced and item:
            raise web.HTTPNotFound()
        return namespace if info.namespaced else ("" if item else None)

    async def _collection(self, request: web.Request) -> web.StreamResponse:
        info = self._resolve(request)
        namespace = self._check_scope(request, info, item=False)
        if request.method == "GET":
            if _flag(request.query.get("watch")):
                return await self._watch(request, info, namespace)
            items, rv, cont, remaining = self.store.list_page(
                info.plural,
                namespace,
                label_selector=request.query.get("labelSelector"),
                field_selector=request.query.get("fieldSelector"),
                limit=_int_param(request, "limit"),
                continue_token=request.query.get("continue") or None,
            )
            if wants_table(request.headers.get("Accept")):
                return _json_response(
                    table(
                        info.plural,
                        items,
                        resource_version=rv,
                        include_object=request.query.get("includeObject", "Metadata"),
                        cont=cont,
                    )
                )
            meta: dict[str, Any] = {"resourceVersion": rv}
            if cont:
                meta.update({"continue": cont, "remainingItemCount": remaining})
            return _json_response(
                {"kind": f"{info.kind}List", "apiVersion": info.api_version, "metadata": meta, "items": items}
            )
        if request.method == "POST" and (namespace is not None or not info.namespaced):
            body = await self._body(request)
            if not isinstance(body, dict):
                raise StoreError(400, "BadRequest", "the request body must be a JSON object")
            meta = body.setdefault("metadata", {})
            if info.namespaced:
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
                if info.plural == "namespaces":
                    body["status"] = {"phase": "Active"}
            uid = str(uuid.uuid4())
            admission.default(info.plural, body)
            if info.plural == "jobs":
                admission.set_job_selector(body, uid)
            admission.validate_create(info.plural, body, self.store, strict=_strict(request))
            if _dry_run(request):
                return _json_response(self.store.dry_run_create(info.plural, body), 201)
            return _json_response(self.store.create(info.plural, body, uid=uid), 201)
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])

    async def _watch(
        self, request: web.Request, info: ResourceInfo, namespace: str | None
    ) -> web.StreamResponse:
        timeout = _int_param(request, "timeoutSeconds")
        rv = request.query.get("resourceVersion")
        label_selector = request.query.get("labelSelector")
        field_selector = request.query.get("fieldSelector")
        as_table = wants_table(request.headers.get("Accept"))
        include_object = request.query.get("includeObject", "Metadata")
        bookmarks = _flag(request.query.get("allowWatchBookmarks"))
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
                bookmark_interval=self.bookmark_interval if bookmarks else None,
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
        first = True

        async def send(event_type: str, obj: dict[str, Any]) -> None:
            nonlocal first
            if as_table and event_type != "BOOKMARK":
                # a watch asked as Table carries one-row Tables; the header only on the first
                obj = table(info.plural, [obj], include_object=include_object, headers=first)
                first = False
            await response.write((_dumps({"type": event_type, "object": obj}) + "\n").encode())

        try:
            async with asyncio.timeout(timeout):
                async for event_type, obj in stream:
                    if event_type == "BOOKMARK":
                        mark = {
                            "kind": info.kind,
                            "apiVersion": info.api_version,
                            "metadata": obj["metadata"],
                        }
                        await send(event_type, mark)
                    else:
                        await send(event_type, obj)
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
        namespace = self._check_scope(request, info, item=True)
        assert namespace is not None
        name = request.match_info["name"]
        sub = request.match_info.get("sub")
        if sub == "log" and info.plural == "pods" and request.method == "GET":
            return await self._log(request, namespace, name)
        if sub == "scale" and info.plural in ("deployments", "replicasets"):
            return await self._scale(request, info, namespace, name)
        if sub not in (None, "status") or (sub == "status" and not info.has_status):
            raise StoreError(
                404, "NotFound", f"the server could not find the requested resource ({request.path})"
            )
        method = request.method
        if method == "GET":
            obj = self.store.get(info.plural, namespace, name)
            if obj is None:
                raise not_found(info, name)
            if wants_table(request.headers.get("Accept")):
                return _json_response(
                    table(
                        info.plural,
                        [obj],
                        resource_version=obj["metadata"].get("resourceVersion"),
                        include_object=request.query.get("includeObject", "Metadata"),
                    )
                )
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
            meta["name"] = name
            if info.namespaced:
                meta["namespace"] = meta.get("namespace") or namespace
                if meta["namespace"] != namespace:
                    raise StoreError(
                        400,
                        "BadRequest",
                        "the namespace of the provided object does not match the namespace sent on the request",
                    )
            return _json_response(self._checked_write(request, info, namespace, name, sub, lambda _cur: body))
        if method == "PATCH":
            body = await self._body(request)
            content_type = request.headers.get("Content-Type", "")
            if _dry_run(request) or _strict(request) or (sub is None and info.plural in admission.VALIDATED):
                return _json_response(
                    self._checked_write(
                        request,
                        info,
                        namespace,
                        name,
                        sub,
                        lambda cur: self.store.patched(info.plural, cur, body, content_type),
                    )
                )
            return _json_response(
                self.store.patch(info.plural, namespace, name, body, content_type, subresource=sub)
            )
        if method == "DELETE" and sub is None:
            return await self._delete(request, info, namespace, name)
        raise web.HTTPMethodNotAllowed(method, ["GET", "PUT", "PATCH", "DELETE"])

    def _checked_write(
        self,
        request: web.Request,
        info: ResourceInfo,
        namespace: str,
        name: str,
        sub: str | None,
        build: Callable[[dict[str, Any]], dict[str, Any]],
    ) -> dict[str, Any]:
        """An update through admission (defaulting, validation, immutability), or a dry run of one."""
        current = self.store.get(info.plural, namespace, name)
        if current is None:
            raise not_found(info, name)
        new = build(current)
        if sub is None:
            admission.default(info.plural, new)
            admission.validate_update(info.plural, new, current, strict=_strict(request))
        if _dry_run(request):
            return self.store.dry_run_write(info.plural, namespace, name, new, sub)
        # a patch carries the stored resourceVersion unless it named one (a precondition)
        return self.store.replace(info.plural, new, subresource=sub)

    async def _scale(
        self, request: web.Request, info: ResourceInfo, namespace: str, name: str
    ) -> web.Response:
        """The autoscaling/v1 Scale of a Deployment or ReplicaSet (`kubectl scale`)."""

        def scale_of(obj: dict[str, Any]) -> dict[str, Any]:
            meta = obj["metadata"]
            return {
                "kind": "Scale",
                "apiVersion": "autoscaling/v1",
                "metadata": {
                    k: meta[k]
                    for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                    if k in meta
                },
                "spec": {"replicas": int((obj.get("spec") or {}).get("replicas", 1))},
                "status": {
                    "replicas": int((obj.get("status") or {}).get("replicas") or 0),
                    "selector": _selector_text((obj.get("spec") or {}).get("selector") or {}),
                },
            }

        current = self.store.get(info.plural, namespace, name)
        if current is None:
            raise not_found(info, name)
        if request.method == "GET":
            return _json_response(scale_of(current))
        if request.method not in ("PUT", "PATCH"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "PUT", "PATCH"])
        body = await self._body(request)
        if request.method == "PATCH":
            body = self.store.patched(
                info.plural, scale_of(current), body, request.headers.get("Content-Type", "")
            )
        replicas = ((body or {}).get("spec") or {}).get("replicas")
        if not isinstance(replicas, int) or replicas < 0:
            raise StoreError(
                422,
                "Invalid",
                f'Scale.autoscaling "{name}" is invalid: spec.replicas: Invalid value: {replicas!r}: '
                "must be greater than or equal to 0",
            )
        if _dry_run(request):
            return _json_response(scale_of({**current, "spec": {**current["spec"], "replicas": replicas}}))

        def set_replicas(obj: dict[str, Any]) -> None:
            obj["spec"]["replicas"] = replicas

        return _json_response(scale_of(self.store.update(info.plural, namespace, name, set_replicas)))

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
        grace = _int_param(request, "gracePeriodSeconds")
        if grace is None and isinstance(options.get("gracePeriodSeconds"), int):
            grace = options["gracePeriodSeconds"]
        pre = options.get("preconditions") or {}
        current = self.store.get(info.plural, namespace, name)
        if current is None:
            raise not_found(info, name)
        if pre and any(
            pre.get(k) not in (None, current["metadata"].get(k)) for k in ("uid", "resourceVersion")
        ):
            raise StoreError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {info.plural} "{name}": the precondition (uid/resourceVersion) does not match',
            )
        if _dry_run(request):
            gone = current
        else:
            gone = self.store.delete(
                info.plural, namespace, name, propagation_policy=policy, grace_period=grace
            )
        # Pods and custom resources answer with the deleted object, the other built-ins with a Status;
        # an object whose deletion waits on finalizers (foreground) answers with the object as it now is.
        pending = not _dry_run(request) and self.store.get(info.plural, namespace, name) is not None
        if info.custom or info.plural == "pods" or pending:
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
