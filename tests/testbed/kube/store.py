"""In-memory object store of one fake Kubernetes cluster: versions, selectors, patches, watches and pod logs."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import json
import re
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

__all__ = [
    "RESOURCES",
    "ResourceInfo",
    "Store",
    "StoreError",
    "apply_json_patch",
    "apply_merge_patch",
    "apply_strategic_merge_patch",
    "match_fields",
    "match_labels",
    "not_found",
    "parse_field_selector",
    "parse_label_selector",
]

_T = TypeVar("_T")

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"


@dataclass(frozen=True)
class ResourceInfo:
    """How the API serves one resource type."""

    plural: str
    group: str  # "" for the core group
    version: str
    kind: str
    has_status: bool  # a /status subresource exists (built-ins only here)
    custom: bool  # a CRD: strategic merge patch is refused with 415
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


_ALL = ("all",)
RESOURCES: dict[str, ResourceInfo] = {
    "deployments": ResourceInfo(
        "deployments", "apps", "v1", "Deployment", True, False, True, ("deploy",), _ALL
    ),
    "replicasets": ResourceInfo("replicasets", "apps", "v1", "ReplicaSet", True, False, True, ("rs",), _ALL),
    "pods": ResourceInfo("pods", "", "v1", "Pod", True, False, True, ("po",), _ALL),
    "events": ResourceInfo("events", "", "v1", "Event", False, False, True, ("ev",)),
    "secrets": ResourceInfo("secrets", "", "v1", "Secret", False, False),
    "serviceaccounts": ResourceInfo(
        "serviceaccounts", "", "v1", "ServiceAccount", False, False, True, ("sa",)
    ),
    "namespaces": ResourceInfo("namespaces", "", "v1", "Namespace", True, False, False, ("ns",)),
    "nodes": ResourceInfo("nodes", "", "v1", "Node", True, False, False, ("no",)),
    "jobs": ResourceInfo("jobs", "batch", "v1", "Job", True, False, True, (), _ALL),
    "applications": ResourceInfo(
        "applications", "argoproj.io", "v1alpha1", "Application", False, True, True, ("app", "apps")
    ),
}

# The real API server orphans a Job's pods when a client deletes it without a propagationPolicy
# (batch/v1 kept that legacy default); everything else defaults to background deletion.
_DEFAULT_PROPAGATION = {"jobs": "Orphan"}
FOREGROUND = "foregroundDeletion"


class StoreError(Exception):
    """A request the API server answers with a Kubernetes Status failure (code, reason, message)."""

    def __init__(
        self, code: int, reason: str, message: str, *, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        """The Kubernetes `Status` body for this error."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _copy(value: _T) -> _T:
    # JSON-shaped data only; several times faster than copy.deepcopy, which matters for the benchmark.
    if isinstance(value, dict):
        return cast("_T", {k: _copy(v) for k, v in value.items()})
    if isinstance(value, list):
        return cast("_T", [_copy(v) for v in value])
    return value


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _info(resource: str) -> ResourceInfo:
    try:
        return RESOURCES[resource]
    except KeyError:
        raise StoreError(
            404, "NotFound", f"the server could not find the requested resource ({resource})"
        ) from None


def not_found(info: ResourceInfo, name: str) -> StoreError:
    group = f"{info.plural}.{info.group}" if info.group else info.plural
    return StoreError(
        404,
        "NotFound",
        f'{group} "{name}" not found',
        details={"name": name, "group": info.group, "kind": info.plural},
    )


def _conflict(info: ResourceInfo, name: str) -> StoreError:
    group = f"{info.plural}.{info.group}" if info.group else info.plural
    return StoreError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {group} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        details={"name": name, "group": info.group, "kind": info.plural},
    )


# ---------------------------------------------------------------------------------------------------------
# Selectors


_LABEL_TERM = re.compile(
    r"""\s*(?:
        (?P<notexists>!\s*(?P<nk>[A-Za-z0-9_./-]+))
      | (?P<setkey>[A-Za-z0-9_./-]+)\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\)
      | (?P<key>[A-Za-z0-9_./-]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[A-Za-z0-9_.-]*))?
    )\s*(?:,|$)""",
    re.VERBOSE,
)

LabelRequirement = tuple[str, str, frozenset[str]]  # key, operator, values


def parse_label_selector(selector: str | None) -> list[LabelRequirement]:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),!g,h`; raise StoreError(400) on bad syntax."""
    if not selector or not selector.strip():
        return []
    out: list[LabelRequirement] = []
    pos = 0
    text = selector.strip()
    while pos < len(text):
        m = _LABEL_TERM.match(text, pos)
        if not m or m.end() == pos:
            raise StoreError(
                400, "BadRequest", f"unable to parse requirement: invalid label selector {selector!r}"
            )
        if m.group("notexists"):
            out.append((m.group("nk"), "!", frozenset()))
        elif m.group("setkey"):
            values = frozenset(v.strip() for v in m.group("values").split(",") if v.strip())
            out.append((m.group("setkey"), m.group("setop"), values))
        elif m.group("op"):
            op = "=" if m.group("op") == "==" else m.group("op")
            out.append((m.group("key"), op, frozenset([m.group("value")])))
        else:
            out.append((m.group("key"), "exists", frozenset()))
        pos = m.end()
    return out


def match_labels(requirements: list[LabelRequirement], labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    for key, op, values in requirements:
        present = key in labels
        value = labels.get(key)
        if op == "=" and value not in values:
            return False
        if op == "!=" and present and value in values:
            return False
        if op == "in" and value not in values:
            return False
        if op == "notin" and present and value in values:
            return False
        if op == "exists" and not present:
            return False
        if op == "!" and present:
            return False
    return True


FieldRequirement = tuple[tuple[str, ...], bool, str]  # path, equal?, value


def parse_field_selector(selector: str | None) -> list[FieldRequirement]:
    """Parse `metadata.name=x,involvedObject.kind!=Pod,status.phase==Running`."""
    if not selector or not selector.strip():
        return []
    out: list[FieldRequirement] = []
    for term in selector.split(","):
        m = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(==|!=|=)\s*(.*?)\s*", term)
        if not m:
            raise StoreError(400, "BadRequest", f"invalid field selector term {term!r} in {selector!r}")
        out.append((tuple(m.group(1).split(".")), m.group(2) != "!=", m.group(3)))
    return out


def _field_value(obj: dict[str, Any], path: tuple[str, ...]) -> str:
    cur: Any = obj
    for part in path:
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def match_fields(requirements: list[FieldRequirement], obj: dict[str, Any]) -> bool:
    return all((_field_value(obj, path) == value) == equal for path, equal, value in requirements)


# ---------------------------------------------------------------------------------------------------------
# Patches


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return _copy(patch)
    result = _copy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


# patchMergeKey of the list fields the bot and the controller touch, as declared in the Kubernetes API types.
# Lists not named here are atomic (replaced), like in the real server.
_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}
# Primitive lists with patchStrategy=merge: union of values.
_MERGE_SETS = {"finalizers"}


def _ports_key(items: list[Any]) -> str:
    # Container ports merge on containerPort, Service ports on port.
    for item in items:
        if isinstance(item, dict) and "containerPort" in item:
            return "containerPort"
    return "port"


def apply_strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch for the built-in types: like merge patch, but known lists merge by key."""
    if not isinstance(patch, dict):
        return _copy(patch)
    if patch.get("$patch") == "replace":
        return {k: _copy(v) for k, v in patch.items() if k != "$patch"}
    if patch.get("$patch") == "delete":
        return None
    result = _copy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key in ("$retainKeys", "$patch"):
            continue  # ordering hints and key retention are client-side niceties kubectl sends
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            drop = set(value or [])
            if isinstance(result.get(field), list):
                result[field] = [v for v in result[field] if v not in drop]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and (key in _MERGE_KEYS or key == "ports"):
            merge_key = _MERGE_KEYS.get(key) or _ports_key(value + list(result.get(key) or []))
            result[key] = _merge_list(result.get(key), value, merge_key)
        elif isinstance(value, list) and key in _MERGE_SETS:
            current = list(result.get(key) or [])
            result[key] = current + [v for v in value if v not in current]
        else:
            merged = apply_strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    return result


def _merge_list(current: Any, patch: list[Any], merge_key: str) -> list[Any]:
    items: list[Any] = _copy(current) if isinstance(current, list) else []
    if any(isinstance(p, dict) and p.get("$patch") == "replace" for p in patch):
        return [_copy(p) for p in patch if not (isinstance(p, dict) and p.get("$patch") == "replace")]
    for element in patch:
        if not isinstance(element, dict) or merge_key not in element:
            items.append(_copy(element))
            continue
        idx = next(
            (
                i
                for i, it in enumerate(items)
                if isinstance(it, dict) and it.get(merge_key) == element[merge_key]
            ),
            None,
        )
        if element.get("$patch") == "delete":
            if idx is not None:
                del items[idx]
        elif idx is None:
            items.append(apply_strategic_merge_patch({}, element))
        else:
            items[idx] = apply_strategic_merge_patch(items[idx], element)
    return items


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise StoreError(422, "Invalid", f"json patch path {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str], path: str) -> Any:
    cur = doc
    for part in parts:
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            raise StoreError(422, "Invalid", f"json patch: path {path!r} does not exist")
    return cur


def _json_patch_add(doc: Any, parts: list[str], value: Any, path: str, *, replace: bool) -> Any:
    if not parts:
        return _copy(value)
    parent = _resolve(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict):
        if replace and last not in parent:
            raise StoreError(422, "Invalid", f"json patch replace: path {path!r} does not exist")
        parent[last] = _copy(value)
    elif isinstance(parent, list):
        if last == "-" and not replace:
            parent.append(_copy(value))
        elif last.isdigit() and int(last) <= len(parent) - (1 if replace else 0):
            if replace:
                parent[int(last)] = _copy(value)
            else:
                parent.insert(int(last), _copy(value))
        else:
            raise StoreError(422, "Invalid", f"json patch: index in path {path!r} is out of range")
    else:
        raise StoreError(422, "Invalid", f"json patch: parent of {path!r} is not an object or array")
    return doc


def _json_patch_remove(doc: Any, parts: list[str], path: str) -> Any:
    if not parts:
        raise StoreError(422, "Invalid", "json patch: cannot remove the whole document")
    parent = _resolve(doc, parts[:-1], path)
    last = parts[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise StoreError(422, "Invalid", f"json patch remove: path {path!r} does not exist")


def apply_json_patch(target: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test); a non-list body is a 400."""
    if not isinstance(ops, list):
        raise StoreError(
            400,
            "BadRequest",
            "json: cannot unmarshal object into Go value of type jsonpatch.Patch (a JSON patch must be a list of operations)",
        )
    doc = _copy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise StoreError(400, "BadRequest", f"json patch operation {op!r} needs 'op' and 'path'")
        kind, path = op["op"], op["path"]
        parts = _pointer(path)
        if kind in ("add", "replace", "test") and "value" not in op:
            raise StoreError(400, "BadRequest", f"json patch {kind} at {path!r} needs a 'value'")
        if kind == "add":
            doc = _json_patch_add(doc, parts, op["value"], path, replace=False)
        elif kind == "replace":
            doc = _json_patch_add(doc, parts, op["value"], path, replace=True)
        elif kind == "remove":
            _json_patch_remove(doc, parts, path)
        elif kind == "test":
            if _resolve(doc, parts, path) != op["value"]:
                raise StoreError(422, "Invalid", f"json patch test failed: value at {path!r} differs")
        elif kind in ("move", "copy"):
            source = op.get("from")
            if not isinstance(source, str):
                raise StoreError(400, "BadRequest", f"json patch {kind} at {path!r} needs 'from'")
            src_parts = _pointer(source)
            if kind == "move":
                value = _json_patch_remove(doc, src_parts, source)
            else:
                value = _copy(_resolve(doc, src_parts, source))
            doc = _json_patch_add(doc, parts, value, path, replace=False)
        else:
            raise StoreError(400, "BadRequest", f"json patch: unknown operation {kind!r}")
    return doc


# ---------------------------------------------------------------------------------------------------------
# The store


@dataclass
class _Event:
    rv: int
    type: str
    resource: str
    obj: dict[str, Any]
    old: (
        dict[str, Any] | None
    )  # the previous state for MODIFIED, so filtered watches can synthesize ADDED/DELETED


@dataclass(frozen=True, slots=True)
class _Past:
    """An event kept for watches that resume from a resourceVersion, as JSON: a thousand versions of an object
    as dict trees would each be scanned by every full garbage collection, and the server would slow down as
    its history fills (the fake API benchmark's last requests ran 30 % slower than its first)."""

    rv: int
    type: str
    resource: str
    state: bytes  # [obj, old]

    @classmethod
    def of(cls, event: _Event) -> _Past:
        return cls(event.rv, event.type, event.resource, json.dumps([event.obj, event.old]).encode())

    def event(self) -> _Event:
        obj, old = json.loads(self.state)
        return _Event(self.rv, self.type, self.resource, obj, old)


class _Watcher:
    def __init__(self, resource: str) -> None:
        self.resource = resource
        self.queue: asyncio.Queue[_Event] = asyncio.Queue()


class Store:
    """All objects of one cluster, keyed by (resource plural, namespace, name), with one resourceVersion counter.

    Pod logs live in a side table, not in the pod: the kubelet calls `set_log`/`append_log`, the API
    server's `/log` endpoint calls `get_log`. Every method except `watch` is synchronous and never
    awaits, so a caller on the event loop sees atomic operations.
    """

    def __init__(
        self,
        *,
        history: int = 1000,
        termination_seconds: float | None = None,
        gc_delay: float | None = None,
    ) -> None:
        """`termination_seconds`/`gc_delay`: see `delete`; None keeps deletion instant and synchronous."""
        self.termination_seconds = termination_seconds
        self.gc_delay = gc_delay
        if history < 1:
            raise ValueError(f"the watch history must keep at least one event, got {history}")
        # resource -> namespace -> name -> object; the namespace level keeps namespaced lists
        # proportional to that namespace, not to the cluster.
        self._objects: dict[str, dict[str, dict[str, dict[str, Any]]]] = {r: {} for r in RESOURCES}
        self._rv = 0
        # One window per kind, as the real watch cache keeps: a burst of pod events does not expire
        # a Deployment watch.
        self._history: dict[str, collections.deque[_Past]] = {
            r: collections.deque(maxlen=history) for r in RESOURCES
        }
        # Every event of a kind with rv <= its floor has been evicted; a watch from below it is a 410.
        self._floor: dict[str, int] = dict.fromkeys(RESOURCES, 0)
        self._watchers: dict[str, set[_Watcher]] = {r: set() for r in RESOURCES}
        self._subscribers: list[asyncio.Queue[tuple[str, str, dict[str, Any]]]] = []
        self._logs: dict[tuple[str, str, str, bool], str] = {}
        self._names = itertools.count()

    # -- reads -------------------------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        _info(resource)
        obj = self._objects[resource].get(namespace, {}).get(name)
        return _copy(obj) if obj is not None else None

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[dict[str, Any]], str]:
        info = _info(resource)
        labels = parse_label_selector(label_selector)
        fields = _supported_fields(info, label_selector, field_selector)
        items = [
            _copy(obj)
            for obj in self._iter(resource, namespace)
            if match_labels(labels, obj["metadata"].get("labels")) and match_fields(fields, obj)
        ]
        return items, str(self._rv)

    def list_page(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> tuple[list[dict[str, Any]], str, str | None, int | None]:
        """One page of a list, as `limit`/`continue` give it: items, resourceVersion, next token, remaining."""
        start = ""
        rv = str(self._rv)
        if continue_token:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(continue_token.encode()))
                start, rv = str(decoded["start"]), str(decoded["rv"])
            except (ValueError, KeyError, TypeError):
                raise StoreError(
                    400, "BadRequest", "continue key is not valid: illegal base64 data or json"
                ) from None
        items, _ = self.list(
            resource, namespace, label_selector=label_selector, field_selector=field_selector
        )
        if start:
            items = [o for o in items if _list_key(o) > start]
        if not limit or limit <= 0 or len(items) <= limit:
            return items, rv, None, None
        page = items[:limit]
        token = base64.urlsafe_b64encode(
            json.dumps({"v": "meta.k8s.io/v1", "rv": int(rv), "start": _list_key(page[-1])}).encode()
        ).decode()
        return page, rv, token, len(items) - limit

    def _iter(self, resource: str, namespace: str | None) -> Iterable[dict[str, Any]]:
        """Objects in the order the real server lists them: by namespace, then name (etcd's key order)."""
        by_ns = self._objects[resource]
        if namespace is not None:
            objs = by_ns.get(namespace, {})
            return [objs[n] for n in sorted(objs)]
        return [by_ns[ns][n] for ns in sorted(by_ns) for n in sorted(by_ns[ns])]

    # -- writes ------------------------------------------------------------------------------------------

    def create(self, resource: str, obj: dict[str, Any], *, uid: str | None = None) -> dict[str, Any]:
        """Store a new object; `uid` is one the API server generated already (a Job's selector names it)."""
        new = self._prepare_create(resource, obj, uid)
        self._rv += 1
        meta = new["metadata"]
        meta["resourceVersion"] = str(self._rv)
        self._objects[resource].setdefault(meta.get("namespace", ""), {})[meta["name"]] = new
        self._emit("ADDED", resource, new, None)
        return _copy(new)

    def dry_run_create(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """What `create` would store, persisting nothing (`dryRun=All`)."""
        new = self._prepare_create(resource, obj, None)
        new["metadata"].pop("resourceVersion", None)
        return new

    def _prepare_create(self, resource: str, obj: dict[str, Any], uid: str | None) -> dict[str, Any]:
        info = _info(resource)
        new = _copy(obj)
        meta = new.setdefault("metadata", {})
        namespace = (meta.get("namespace") or "default") if info.namespaced else ""
        name = meta.get("name")
        if not name:
            prefix = meta.get("generateName")
            if not prefix:
                raise StoreError(
                    422,
                    "Invalid",
                    f"{info.kind} is invalid: metadata.name: Required value: name or generateName is required",
                )
            name = f"{prefix}{uuid.uuid4().hex[:5]}"
            while name in self._objects[resource].get(namespace, {}):
                name = f"{prefix}{uuid.uuid4().hex[:5]}"
        if name in self._objects[resource].get(namespace, {}):
            group = f"{info.plural}.{info.group}" if info.group else info.plural
            raise StoreError(
                409,
                "AlreadyExists",
                f'{group} "{name}" already exists',
                details={"name": name, "group": info.group, "kind": info.plural},
            )
        new["apiVersion"] = info.api_version
        new["kind"] = info.kind
        if info.namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        meta.update(
            name=name,
            uid=uid or str(uuid.uuid4()),
            creationTimestamp=_now(),
            generation=1,
        )
        meta.pop("deletionTimestamp", None)
        meta.pop("deletionGracePeriodSeconds", None)
        return new

    def patched(self, resource: str, current: dict[str, Any], body: Any, content_type: str) -> dict[str, Any]:
        """`current` with a patch applied, stored nowhere (for admission and dry runs)."""
        return self._apply_patch(_info(resource), current, body, content_type)

    def dry_run_write(
        self, resource: str, namespace: str, name: str, new: dict[str, Any], subresource: str | None
    ) -> dict[str, Any]:
        """What a write would store, persisting nothing (`dryRun=All`)."""
        saved_rv, objects = self._rv, self._objects[resource].get(namespace, {})
        before = objects.get(name)
        watchers, subscribers, history = self._watchers[resource], self._subscribers, self._history[resource]
        self._watchers[resource], self._subscribers = set(), []
        self._history[resource] = collections.deque(maxlen=history.maxlen)
        try:
            return self._write(resource, namespace, name, _copy(new), subresource, check_rv=True)
        finally:
            self._rv = saved_rv
            if before is not None:
                objects[name] = before
            self._watchers[resource], self._subscribers, self._history[resource] = (
                watchers,
                subscribers,
                history,
            )

    def replace(
        self, resource: str, obj: dict[str, Any], *, subresource: str | None = None
    ) -> dict[str, Any]:
        meta = obj.get("metadata") or {}
        namespace = (meta.get("namespace") or "default") if _info(resource).namespaced else ""
        name = meta.get("name") or ""
        return self._write(resource, namespace, name, _copy(obj), subresource, check_rv=True)

    def update(
        self,
        resource: str,
        namespace: str,
        name: str,
        fn: Callable[[dict[str, Any]], None],
        *,
        subresource: str | None = None,
        system: bool = False,
    ) -> dict[str, Any]:
        """Read-modify-write in one step (no conflict possible): `fn` mutates a copy in place.

        `system` lets the write set what only the server sets (deletionTimestamp).
        """
        current = self._current(resource, namespace, name)
        draft = _copy(current)
        fn(draft)
        return self._write(resource, namespace, name, draft, subresource, check_rv=True, system=system)

    def patch(
        self,
        resource: str,
        namespace: str,
        name: str,
        body: Any,
        content_type: str,
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        info = _info(resource)
        current = self._current(resource, namespace, name)
        patched = self._apply_patch(info, current, body, content_type)
        # A patch that names a resourceVersion is an optimistic-concurrency precondition.
        return self._write(resource, namespace, name, patched, subresource, check_rv=True)

    @staticmethod
    def _apply_patch(
        info: ResourceInfo, current: dict[str, Any], body: Any, content_type: str
    ) -> dict[str, Any]:
        ctype = content_type.split(";", maxsplit=1)[0].strip().lower()
        if ctype == MERGE_PATCH:
            if not isinstance(body, dict):
                raise StoreError(400, "BadRequest", "a merge patch body must be a JSON object")
            patched = apply_merge_patch(current, body)
        elif ctype == STRATEGIC_MERGE_PATCH:
            if info.custom:
                raise StoreError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types include: "
                    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                )
            if not isinstance(body, dict):
                raise StoreError(400, "BadRequest", "a strategic merge patch body must be a JSON object")
            patched = apply_strategic_merge_patch(current, body)
        elif ctype == JSON_PATCH:
            patched = apply_json_patch(current, body)
        elif ctype == "application/apply-patch+yaml":
            raise StoreError(
                415,
                "UnsupportedMediaType",
                "server-side apply (application/apply-patch+yaml) is not supported by the fake API server; "
                "use a merge, strategic merge or JSON patch",
            )
        else:
            raise StoreError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format ({content_type}) - accepted media types include: "
                "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
                + ("" if info.custom else ", application/strategic-merge-patch+json"),
            )
        if not isinstance(patched, dict):
            raise StoreError(422, "Invalid", "the patched object is not a JSON object")
        return patched

    def delete(
        self,
        resource: str,
        namespace: str,
        name: str,
        *,
        propagation_policy: str | None = None,
        grace_period: int | None = None,
    ) -> dict[str, Any]:
        """Delete an object; a scheduled pod first goes Terminating (deletionTimestamp) for its grace period.

        With `termination_seconds` set, a Terminating pod is removed after that long (its containers
        took that long to stop), never later than its grace period; a grace period of 0 removes it now.
        Dependents are removed by the garbage collector: after `gc_delay` seconds when it is set, at once
        (inside this call) when it is None.
        """
        info = _info(resource)
        obj = self._objects[resource].get(namespace, {}).get(name)
        if obj is None:
            raise not_found(info, name)
        if resource == "pods" and self.termination_seconds is not None and grace_period != 0:
            meta = obj["metadata"]
            if meta.get("deletionTimestamp"):
                return _copy(obj)  # already Terminating: the first deletion's grace period runs
            if (obj.get("spec") or {}).get("nodeName"):
                grace = grace_period
                if grace is None:
                    grace = int((obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
                stamp = datetime.now(UTC) + timedelta(seconds=grace)

                def terminating(pod: dict[str, Any]) -> None:
                    pod["metadata"]["deletionTimestamp"] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
                    pod["metadata"]["deletionGracePeriodSeconds"] = grace

                out = self.update(resource, namespace, name, terminating, system=True)
                uid = meta["uid"]
                delay = min(float(grace), self.termination_seconds)
                asyncio.get_running_loop().call_later(delay, self._finish_termination, namespace, name, uid)
                return out
        policy = propagation_policy or _DEFAULT_PROPAGATION.get(resource, "Background")
        if FOREGROUND in (obj["metadata"].get("finalizers") or []):
            return _copy(obj)  # a foreground deletion is under way: it ends when the dependents are gone
        if policy == "Foreground":
            return self._delete_foreground(resource, namespace, name)
        gone = self._remove(resource, namespace, name)
        if policy == "Orphan":
            self._orphan_dependents(namespace, obj["metadata"]["uid"])
        else:
            if self.gc_delay is None:
                self._collect_dependents(namespace, obj["metadata"]["uid"])
            else:
                asyncio.get_running_loop().call_later(
                    self.gc_delay, self._collect_dependents, namespace, obj["metadata"]["uid"]
                )
        return gone

    def _remove(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        """The object leaves the store (DELETED); an owner waiting in foreground deletion may go next."""
        obj = self._objects[resource][namespace].pop(name)
        self._rv += 1
        gone = _copy(obj)
        gone["metadata"]["resourceVersion"] = str(self._rv)
        self._emit("DELETED", resource, gone, None)
        for ref in obj["metadata"].get("ownerReferences") or []:
            self._finish_foreground(namespace, str(ref.get("uid") or ""))
        return _copy(gone)

    def _dependents(self, namespace: str, owner_uid: str) -> list[tuple[str, dict[str, Any]]]:
        return [
            (resource, dep)
            for resource, by_ns in self._objects.items()
            for dep in list(by_ns.get(namespace, {}).values())
            if any(ref.get("uid") == owner_uid for ref in dep["metadata"].get("ownerReferences") or [])
        ]

    def _delete_foreground(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        """propagationPolicy Foreground: the owner stays, with a deletionTimestamp and the foregroundDeletion
        finalizer, while the garbage collector deletes its dependents; it goes when no dependent with
        blockOwnerDeletion is left."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        def deleting(obj: dict[str, Any]) -> None:
            obj["metadata"].setdefault("deletionTimestamp", stamp)
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            obj["metadata"]["finalizers"] = [*(obj["metadata"].get("finalizers") or []), FOREGROUND]

        out = self.update(resource, namespace, name, deleting, system=True)
        uid = out["metadata"]["uid"]
        if self.gc_delay is None:
            self._collect_foreground(namespace, uid)
        else:
            asyncio.get_running_loop().call_later(self.gc_delay, self._collect_foreground, namespace, uid)
        return self.get(resource, namespace, name) or out

    def _collect_foreground(self, namespace: str, owner_uid: str) -> None:
        # like the real collector: a dependent with dependents of its own is deleted in the foreground too
        for resource, dep in self._dependents(namespace, owner_uid):
            own = self._dependents(namespace, dep["metadata"]["uid"])
            with contextlib.suppress(StoreError):
                self.delete(
                    resource,
                    namespace,
                    dep["metadata"]["name"],
                    propagation_policy="Foreground" if own else "Background",
                )
        self._finish_foreground(namespace, owner_uid)

    def _finish_foreground(self, namespace: str, owner_uid: str) -> None:
        for resource, by_ns in self._objects.items():
            owner = next(
                (o for o in by_ns.get(namespace, {}).values() if o["metadata"].get("uid") == owner_uid), None
            )
            if owner is None:
                continue
            if FOREGROUND not in (owner["metadata"].get("finalizers") or []):
                return
            blocking = [
                dep
                for _, dep in self._dependents(namespace, owner_uid)
                if any(
                    ref.get("uid") == owner_uid and ref.get("blockOwnerDeletion")
                    for ref in dep["metadata"].get("ownerReferences") or []
                )
            ]
            if blocking:
                return
            name = owner["metadata"]["name"]

            def release(obj: dict[str, Any]) -> None:
                kept = [f for f in obj["metadata"].get("finalizers") or [] if f != FOREGROUND]
                if kept:
                    obj["metadata"]["finalizers"] = kept
                else:
                    obj["metadata"].pop("finalizers", None)

            after = self.update(resource, namespace, name, release, system=True)
            if not after["metadata"].get("finalizers"):
                self._remove(resource, namespace, name)
            return

    def _orphan_dependents(self, namespace: str, owner_uid: str) -> None:
        """Orphan propagation: the garbage collector strips the gone owner's reference from its dependents."""
        for resource, by_ns in self._objects.items():
            for dep in list(by_ns.get(namespace, {}).values()):
                refs = dep["metadata"].get("ownerReferences") or []
                if not any(ref.get("uid") == owner_uid for ref in refs):
                    continue

                def strip(obj: dict[str, Any]) -> None:
                    kept = [
                        r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != owner_uid
                    ]
                    if kept:
                        obj["metadata"]["ownerReferences"] = kept
                    else:
                        obj["metadata"].pop("ownerReferences", None)

                self.update(resource, namespace, dep["metadata"]["name"], strip)

    def _finish_termination(self, namespace: str, name: str, uid: str) -> None:
        pod = self._objects["pods"].get(namespace, {}).get(name)
        if pod is not None and pod["metadata"]["uid"] == uid:
            self.delete("pods", namespace, name, grace_period=0)

    def _collect_dependents(self, namespace: str, owner_uid: str) -> None:
        for resource, by_ns in self._objects.items():
            for dep in list(by_ns.get(namespace, {}).values()):
                owners = dep["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == owner_uid for ref in owners):
                    self.delete(resource, namespace, dep["metadata"]["name"], propagation_policy="Background")

    def _current(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        info = _info(resource)
        obj = self._objects[resource].get(namespace, {}).get(name)
        if obj is None:
            raise not_found(info, name)
        return obj

    def _write(
        self,
        resource: str,
        namespace: str,
        name: str,
        new: dict[str, Any],
        subresource: str | None,
        *,
        check_rv: bool,
        system: bool = False,
    ) -> dict[str, Any]:
        info = _info(resource)
        if subresource not in (None, "status") or (subresource == "status" and not info.has_status):
            raise StoreError(
                404,
                "NotFound",
                f"the server could not find the requested resource ({resource}/{subresource})",
            )
        current = self._current(resource, namespace, name)
        cur_meta = current["metadata"]
        new_meta = new.get("metadata")
        if not isinstance(new_meta, dict):
            new_meta = {}
        if new_meta.get("name", name) != name:
            raise StoreError(
                400,
                "BadRequest",
                f"the name of the object ({new_meta.get('name')}) does not match the name on the URL ({name})",
            )
        if info.namespaced and new_meta.get("namespace", namespace) != namespace:
            raise StoreError(
                400, "BadRequest", "the namespace of the object does not match the namespace on the URL"
            )
        sent_rv = new_meta.get("resourceVersion")
        if check_rv and sent_rv and sent_rv != cur_meta["resourceVersion"]:
            raise _conflict(info, name)

        if subresource == "status":
            # The status subresource takes .status only; everything else stays as stored.
            result = _copy(current)
            if "status" in new:
                result["status"] = _copy(new["status"])
            else:
                result.pop("status", None)
        else:
            result = new
            if info.has_status:
                # A main-resource write never touches status on types with a status subresource.
                if "status" in current:
                    result["status"] = _copy(current["status"])
                else:
                    result.pop("status", None)
            # System-owned metadata cannot be changed by clients.
            meta = dict(new_meta)
            owned = ("uid", "creationTimestamp", "generation")
            if not system:
                owned += ("deletionTimestamp", "deletionGracePeriodSeconds")
            for key in owned:
                if key in cur_meta:
                    meta[key] = cur_meta[key]
                else:
                    meta.pop(key, None)
            meta["name"] = name
            if info.namespaced:
                meta["namespace"] = namespace
            result["metadata"] = meta
            if self._spec_changed(info, current, result):
                meta["generation"] = int(cur_meta.get("generation", 1)) + 1
        result["apiVersion"] = info.api_version
        result["kind"] = info.kind

        # A write that changes nothing does not bump the resourceVersion, like the real server.
        result["metadata"]["resourceVersion"] = cur_meta["resourceVersion"]
        if result == current:
            return _copy(current)
        self._rv += 1
        result["metadata"]["resourceVersion"] = str(self._rv)
        self._objects[resource][namespace][name] = result
        self._emit("MODIFIED", resource, result, current)
        return _copy(result)

    @staticmethod
    def _spec_changed(info: ResourceInfo, old: dict[str, Any], new: dict[str, Any]) -> bool:
        if info.has_status:
            return old.get("spec") != new.get("spec")
        # Without a status subresource every field but metadata counts, status and Argo CD's
        # `operation` included (a CRD without the subresource bumps generation on a status write).
        keys = (set(old) | set(new)) - {"metadata", "apiVersion", "kind"}
        return any(old.get(k) != new.get(k) for k in keys)

    # -- events ------------------------------------------------------------------------------------------

    def _emit(self, event_type: str, resource: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        # Stored objects are replaced, never mutated in place, so the history can share them.
        event = _Event(self._rv, event_type, resource, obj, old)
        history = self._history[resource]
        if len(history) == history.maxlen:
            self._floor[resource] = history[0].rv
        history.append(_Past.of(event))
        for watcher in self._watchers[resource]:
            watcher.queue.put_nowait(event)
        for queue in self._subscribers:
            queue.put_nowait((event_type, resource, _copy(obj)))

    def watch_count(self, resource: str | None = None) -> int:
        """How many watches are open (for one resource, or all): tests use it to prove watches are released."""
        groups = [self._watchers[resource]] if resource is not None else list(self._watchers.values())
        return sum(len(g) for g in groups)

    def history_size(self) -> int:
        return sum(len(h) for h in self._history.values())

    def subscribe(self) -> asyncio.Queue[tuple[str, str, dict[str, Any]]]:
        """A queue of (event_type, resource, object) for every change, for an in-process informer."""
        queue: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue()
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[tuple[str, str, dict[str, Any]]]) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    def check_watch_start(self, resource: str, resource_version: str | None) -> None:
        """Raise StoreError(410) now if a watch from this resourceVersion cannot be served."""
        _info(resource)
        rv = _parse_rv(resource_version)
        floor = self._floor[resource]
        if rv is not None and rv != 0 and rv < floor:
            raise StoreError(
                410,
                "Expired",
                f"too old resource version: {rv} ({floor + 1})",
            )

    async def watch(
        self,
        resource: str,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        bookmark_interval: float | None = None,
    ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """Changes after `resource_version`; without one (or "0"), synthetic ADDED for what exists, then changes.

        With `bookmark_interval`, a quiet watch yields ("BOOKMARK", {"metadata": {"resourceVersion"}}) that
        often, as the watch cache does for clients that allow bookmarks.

        Objects that stop (start) matching the selectors arrive as DELETED (ADDED), like the real server.
        """
        labels = parse_label_selector(label_selector)
        fields = _supported_fields(_info(resource), label_selector, field_selector)
        self.check_watch_start(resource, resource_version)
        rv = _parse_rv(resource_version)

        def matches(obj: dict[str, Any] | None) -> bool:
            if obj is None:
                return False
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                return False
            return match_labels(labels, obj["metadata"].get("labels")) and match_fields(fields, obj)

        watcher = _Watcher(resource)
        # Snapshot and registration happen without an await in between, so no event is lost or doubled.
        if rv is None or rv == 0:
            backlog = [
                _Event(self._rv, "ADDED", resource, obj, None)
                for obj in self._iter(resource, namespace)
                if matches(obj)
            ]
        else:
            backlog = [e.event() for e in self._history[resource] if e.rv > rv]
        self._watchers[resource].add(watcher)
        try:
            for event in backlog:
                out = self._filter(event, matches)
                if out is not None:
                    yield out
            while True:
                if bookmark_interval is None:
                    event = await watcher.queue.get()
                else:
                    try:
                        async with asyncio.timeout(bookmark_interval):
                            event = await watcher.queue.get()
                    except TimeoutError:
                        yield "BOOKMARK", {"metadata": {"resourceVersion": str(self._rv)}}
                        continue
                out = self._filter(event, matches)
                if out is not None:
                    yield out
        finally:
            self._watchers[resource].discard(watcher)

    @staticmethod
    def _filter(
        event: _Event, matches: Callable[[dict[str, Any] | None], bool]
    ) -> tuple[str, dict[str, Any]] | None:
        now, before = matches(event.obj), matches(event.old)
        if event.type == "MODIFIED":
            if now and before:
                return "MODIFIED", _copy(event.obj)
            if now:
                return "ADDED", _copy(event.obj)
            if before:
                return "DELETED", _copy(event.obj)
            return None
        return (event.type, _copy(event.obj)) if now else None

    # -- pod logs ----------------------------------------------------------------------------------------

    def set_log(self, namespace: str, pod: str, container: str, text: str, *, previous: bool = False) -> None:
        """Replace a container's log (the kubelet's side of `kubectl logs`)."""
        self._logs[(namespace, pod, container, previous)] = text

    def append_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        key = (namespace, pod, container, False)
        self._logs[key] = self._logs.get(key, "") + text

    def rotate_log(self, namespace: str, pod: str, container: str) -> None:
        """A container restarted: its current log becomes the `previous=true` log."""
        current = self._logs.pop((namespace, pod, container, False), "")
        self._logs[(namespace, pod, container, True)] = current

    def get_log(
        self,
        namespace: str,
        pod: str,
        container: str | None = None,
        *,
        previous: bool = False,
        tail_lines: int | None = None,
    ) -> str:
        """A container's log as the API server returns it, with the kubelet's 400s for waiting containers."""
        obj = self._current("pods", namespace, pod)
        names = [c.get("name") for c in (obj.get("spec") or {}).get("containers") or []]
        if container is None:
            if len(names) != 1:
                raise StoreError(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {pod}, choose one of: [{' '.join(map(str, names))}]",
                )
            container = str(names[0])
        init_names = [c.get("name") for c in (obj.get("spec") or {}).get("initContainers") or []]
        if container not in names and container not in init_names:
            raise StoreError(400, "BadRequest", f"container {container} is not valid for pod {pod}")
        status = obj.get("status") or {}
        statuses = (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or [])
        state = next((s for s in statuses if s.get("name") == container), None)
        if previous:
            key = (namespace, pod, container, True)
            if key not in self._logs:
                raise StoreError(
                    400, "BadRequest", f'previous terminated container "{container}" in pod "{pod}" not found'
                )
        else:
            waiting = None
            key = (namespace, pod, container, False)
            current_state = (state or {}).get("state") or {}
            last_terminated = ((state or {}).get("lastState") or {}).get("terminated")
            if state is None:
                waiting = "ContainerCreating"
            elif current_state.get("waiting") is not None:
                if last_terminated is None:
                    waiting = current_state["waiting"].get("reason") or "ContainerCreating"
                elif key not in self._logs:
                    # Between restarts (CrashLoopBackOff) the kubelet serves the last terminated container.
                    key = (namespace, pod, container, True)
            if waiting is not None:
                reason = {
                    "ErrImagePull": "image can't be pulled",
                    "ImagePullBackOff": "trying and failing to pull image",
                }.get(waiting, waiting)
                raise StoreError(
                    400, "BadRequest", f'container "{container}" in pod "{pod}" is waiting to start: {reason}'
                )
        text = self._logs.get(key, "")
        if tail_lines is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail_lines:]) if tail_lines > 0 else ""
        return text

    def new_name(self, prefix: str) -> str:
        """A unique name for controller-made objects (events, pods)."""
        return f"{prefix}{next(self._names):05x}"


def _list_key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', '')}/{meta['name']}"


# The field labels each kind's registry converts (pkg/registry/*/strategy.go); everything else is a 400.
_FIELD_LABELS: dict[str, frozenset[str]] = {
    "pods": frozenset(
        {
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.podIPs",
            "status.nominatedNodeName",
        }
    ),
    "events": frozenset(
        {
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        }
    ),
    "secrets": frozenset({"type"}),
    "namespaces": frozenset({"status.phase"}),
    "nodes": frozenset({"spec.unschedulable"}),
    "replicasets": frozenset({"status.replicas"}),
    "jobs": frozenset({"status.successful"}),
}


def _supported_fields(
    info: ResourceInfo, label_selector: str | None, field_selector: str | None
) -> list[FieldRequirement]:
    fields = parse_field_selector(field_selector)
    allowed = _FIELD_LABELS.get(info.plural, frozenset())
    for path, _, _ in fields:
        label = ".".join(path)
        if label in ("metadata.name", "metadata.namespace") or label in allowed:
            continue
        gv = f"{info.group}/{info.version}" if info.group else f"/{info.version}"
        raise StoreError(
            400,
            "BadRequest",
            f'Unable to find "{gv}, Resource={info.plural}" that match label selector '
            f'"{label_selector or ""}", field selector "{field_selector}": field label not supported: {label}',
        )
    return fields


def _parse_rv(resource_version: str | None) -> int | None:
    if resource_version is None or resource_version == "":
        return None
    try:
        return int(resource_version)
    except ValueError:
        raise StoreError(400, "BadRequest", f"invalid resourceVersion {resource_version!r}") from None
