"""Server-side printing: the `meta.k8s.io/v1` Table a real API server answers when kubectl asks for one.

The columns and cell texts follow the API server's own printers (pkg/printers/internalversion) for the
built-in kinds the runbook looks at, and the CRD's additionalPrinterColumns for Argo CD's Application.
Age cells are computed here, as the server does, with apimachinery's HumanDuration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

__all__ = ["human_duration", "table", "wants_table"]

Obj = dict[str, Any]
Column = tuple[str, str, str, int]  # name, type, format, priority (1: only with -o wide)

_NAME: Column = ("Name", "string", "name", 0)
_AGE: Column = ("Age", "string", "", 0)


def wants_table(accept: str | None) -> bool:
    """kubectl asks `application/json;as=Table;v=v1;g=meta.k8s.io,...` for human-readable output."""
    return bool(accept) and "as=Table" in str(accept) and "g=meta.k8s.io" in str(accept)


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if rest == 0 else f"{hours // 24 // 365}y{rest}d"
    return f"{hours // 24 // 365}y"


def _since(stamp: str | None) -> str:
    if not stamp:
        return "<unknown>"
    try:
        then = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    return human_duration((datetime.now(UTC) - then).total_seconds())


def _age(obj: Obj) -> str:
    return _since((obj.get("metadata") or {}).get("creationTimestamp"))


def _containers(obj: Obj) -> tuple[str, str]:
    spec = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    cs = spec.get("containers") or []
    return ",".join(c.get("name", "") for c in cs), ",".join(c.get("image", "") for c in cs)


def _selector(obj: Obj) -> str:
    sel = (obj.get("spec") or {}).get("selector") or {}
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for expr in sel.get("matchExpressions") or []:
        values = ",".join(expr.get("values") or [])
        op = str(expr.get("operator", "")).lower()
        parts.append(f"{expr.get('key')} {op} ({values})" if values else f"{expr.get('key')}")
    return ",".join(parts) or "<none>"


# -- pods ---------------------------------------------------------------------------------------------


def pod_status_text(pod: Obj) -> str:
    """The STATUS column of `kubectl get pods` (printPod)."""
    status = pod.get("status") or {}
    reason = status.get("reason") or status.get("phase") or "Unknown"
    init_statuses = status.get("initContainerStatuses") or []
    init_total = len((pod.get("spec") or {}).get("initContainers") or [])
    initializing = False
    for i, cs in enumerate(init_statuses):
        state = cs.get("state") or {}
        term = state.get("terminated")
        waiting = state.get("waiting")
        if term and term.get("exitCode") == 0:
            continue
        if term:
            if term.get("reason"):
                reason = f"Init:{term['reason']}"
            elif term.get("signal"):
                reason = f"Init:Signal:{term['signal']}"
            else:
                reason = f"Init:ExitCode:{term.get('exitCode')}"
        elif waiting and waiting.get("reason") and waiting["reason"] != "PodInitializing":
            reason = f"Init:{waiting['reason']}"
        else:
            reason = f"Init:{i}/{init_total}"
        initializing = True
        break
    if not initializing:
        has_running = False
        for cs in reversed(status.get("containerStatuses") or []):
            state = cs.get("state") or {}
            waiting, term = state.get("waiting"), state.get("terminated")
            if waiting and waiting.get("reason"):
                reason = waiting["reason"]
            elif term and term.get("reason"):
                reason = term["reason"]
            elif term:
                reason = (
                    f"Signal:{term['signal']}" if term.get("signal") else f"ExitCode:{term.get('exitCode')}"
                )
            elif cs.get("ready") and state.get("running"):
                has_running = True
        if reason == "Completed" and has_running:
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
            )
            reason = "Running" if ready else "NotReady"
    meta = pod.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        reason = "Unknown" if status.get("reason") == "NodeLost" else "Terminating"
    return str(reason)


def _pod_row(pod: Obj) -> list[Any]:
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for c in statuses if c.get("ready"))
    restarts = 0
    last: str | None = None
    init_statuses = status.get("initContainerStatuses") or []
    source = init_statuses if any((c.get("restartCount") or 0) for c in init_statuses) else statuses
    for cs in source:
        restarts += int(cs.get("restartCount") or 0)
        finished = ((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt")
        if finished and (last is None or finished > last):
            last = finished
    restarts_text = f"{restarts} ({_since(last)} ago)" if restarts and last else str(restarts)
    return [
        pod["metadata"]["name"],
        f"{ready}/{len(spec.get('containers') or [])}",
        pod_status_text(pod),
        restarts_text,
        _age(pod),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>",
        "<none>",
    ]


_POD_COLUMNS: list[Column] = [
    _NAME,
    ("Ready", "string", "", 0),
    ("Status", "string", "", 0),
    ("Restarts", "string", "", 0),
    _AGE,
    ("IP", "string", "", 1),
    ("Node", "string", "", 1),
    ("Nominated Node", "string", "", 1),
    ("Readiness Gates", "string", "", 1),
]


# -- workloads ----------------------------------------------------------------------------------------


def _deployment_row(dep: Obj) -> list[Any]:
    status = dep.get("status") or {}
    containers, images = _containers(dep)
    return [
        dep["metadata"]["name"],
        f"{int(status.get('readyReplicas') or 0)}/{int((dep.get('spec') or {}).get('replicas', 1))}",
        int(status.get("updatedReplicas") or 0),
        int(status.get("availableReplicas") or 0),
        _age(dep),
        containers,
        images,
        _selector(dep),
    ]


def _replicaset_row(rs: Obj) -> list[Any]:
    status = rs.get("status") or {}
    containers, images = _containers(rs)
    return [
        rs["metadata"]["name"],
        int((rs.get("spec") or {}).get("replicas", 1)),
        int(status.get("replicas") or 0),
        int(status.get("readyReplicas") or 0),
        _age(rs),
        containers,
        images,
        _selector(rs),
    ]


def _job_status(job: Obj) -> str:
    conditions = {
        c.get("type") for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"
    }
    if "Complete" in conditions:
        return "Complete"
    if "Failed" in conditions:
        return "Failed"
    if (job.get("metadata") or {}).get("deletionTimestamp"):
        return "Terminating"
    if "Suspended" in conditions:
        return "Suspended"
    if "FailureTarget" in conditions:
        return "FailureTarget"
    return "Running"


def _duration(job: Obj) -> str:
    status = job.get("status") or {}
    start = status.get("startTime")
    if not start:
        return ""
    end = status.get("completionTime")
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    try:
        t0 = datetime.strptime(start, fmt).replace(tzinfo=UTC)
        t1 = datetime.strptime(end, fmt).replace(tzinfo=UTC) if end else datetime.now(UTC)
    except ValueError:
        return ""
    return human_duration((t1 - t0).total_seconds())


def _job_row(job: Obj) -> list[Any]:
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    completions = spec.get("completions")
    succeeded = int(status.get("succeeded") or 0)
    if completions is not None:
        done = f"{succeeded}/{completions}"
    else:
        parallelism = int(spec.get("parallelism", 1))
        done = f"{succeeded}/1 of {parallelism}" if parallelism > 1 else f"{succeeded}/1"
    containers, images = _containers(job)
    return [
        job["metadata"]["name"],
        _job_status(job),
        done,
        _duration(job),
        _age(job),
        containers,
        images,
        _selector(job),
    ]


def _event_row(ev: Obj) -> list[Any]:
    obj = ev.get("involvedObject") or {}
    last = (
        ev.get("lastTimestamp") or ev.get("eventTime") or (ev.get("metadata") or {}).get("creationTimestamp")
    )
    return [
        _since(last),
        ev.get("type") or "Normal",
        ev.get("reason") or "",
        f"{str(obj.get('kind', '')).lower()}/{obj.get('name', '')}",
        ev.get("message") or "",
    ]


def _application_row(app: Obj) -> list[Any]:
    status = app.get("status") or {}
    return [
        app["metadata"]["name"],
        (status.get("sync") or {}).get("status") or "",
        (status.get("health") or {}).get("status") or "",
        _age(app),
    ]


def _namespace_row(ns: Obj) -> list[Any]:
    return [ns["metadata"]["name"], (ns.get("status") or {}).get("phase") or "Active", _age(ns)]


def _secret_row(secret: Obj) -> list[Any]:
    return [
        secret["metadata"]["name"],
        secret.get("type") or "Opaque",
        len(secret.get("data") or {}),
        _age(secret),
    ]


def _serviceaccount_row(sa: Obj) -> list[Any]:
    return [sa["metadata"]["name"], len(sa.get("secrets") or []), _age(sa)]


def _node_row(node: Obj) -> list[Any]:
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (node.get("status") or {}).get("conditions") or []
    )
    info = (node.get("status") or {}).get("nodeInfo") or {}
    return [
        node["metadata"]["name"],
        "Ready" if ready else "NotReady",
        "<none>",
        _age(node),
        info.get("kubeletVersion", ""),
    ]


_PRINTERS: dict[str, tuple[list[Column], Callable[[Obj], list[Any]]]] = {
    "pods": (_POD_COLUMNS, _pod_row),
    "deployments": (
        [
            _NAME,
            ("Ready", "string", "", 0),
            ("Up-to-date", "integer", "", 0),
            ("Available", "integer", "", 0),
            _AGE,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        _deployment_row,
    ),
    "replicasets": (
        [
            _NAME,
            ("Desired", "integer", "", 0),
            ("Current", "integer", "", 0),
            ("Ready", "integer", "", 0),
            _AGE,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        _replicaset_row,
    ),
    "jobs": (
        [
            _NAME,
            ("Status", "string", "", 0),
            ("Completions", "string", "", 0),
            ("Duration", "string", "", 0),
            _AGE,
            ("Containers", "string", "", 1),
            ("Images", "string", "", 1),
            ("Selector", "string", "", 1),
        ],
        _job_row,
    ),
    "events": (
        [
            ("Last Seen", "string", "", 0),
            ("Type", "string", "", 0),
            ("Reason", "string", "", 0),
            ("Object", "string", "", 0),
            ("Message", "string", "", 0),
        ],
        _event_row,
    ),
    # the Argo CD CRD's additionalPrinterColumns
    "applications": (
        [_NAME, ("Sync Status", "string", "", 0), ("Health Status", "string", "", 0), _AGE],
        _application_row,
    ),
    "namespaces": ([_NAME, ("Status", "string", "", 0), _AGE], _namespace_row),
    "secrets": ([_NAME, ("Type", "string", "", 0), ("Data", "string", "", 0), _AGE], _secret_row),
    "serviceaccounts": ([_NAME, ("Secrets", "string", "", 0), _AGE], _serviceaccount_row),
    "nodes": (
        [_NAME, ("Status", "string", "", 0), ("Roles", "string", "", 0), _AGE, ("Version", "string", "", 0)],
        _node_row,
    ),
}


def _partial(obj: Obj) -> Obj:
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata") or {},
    }


def table(
    resource: str,
    objects: Iterable[Obj],
    *,
    resource_version: str | None = None,
    include_object: str = "Metadata",
    headers: bool = True,
    cont: str | None = None,
) -> Obj:
    """A `Table` of these objects; `include_object` is the request's includeObject (None|Metadata|Object)."""
    columns, row = _PRINTERS.get(resource, ([_NAME, _AGE], lambda o: [o["metadata"]["name"], _age(o)]))
    rows = []
    for obj in objects:
        entry: Obj = {"cells": row(obj)}
        if include_object == "Object":
            entry["object"] = obj
        elif include_object != "None":
            entry["object"] = _partial(obj)
        rows.append(entry)
    meta: Obj = {}
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    if cont:
        meta["continue"] = cont
    out: Obj = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
    if headers:
        out["columnDefinitions"] = [
            {"name": n, "type": t, "format": f, "description": "", "priority": p} for n, t, f, p in columns
        ]
    else:
        out["columnDefinitions"] = None
    out["rows"] = rows
    return out
