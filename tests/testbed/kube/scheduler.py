"""The scheduler's and admission's say over a new pod: which node it may run on, or why it may not exist.

`place` follows kube-scheduler's filters the workloads here can trip (nodeSelector, CPU/memory requests
against allocatable) and its FailedScheduling text; `admit` is the ServiceAccount admission plugin's
check, whose refusal the Job controller reports as a FailedCreate event on the Job. `schedule_pending` is
the scheduler's retry: a pod left Pending is tried again when the cluster changes in a way that may let
it fit (a node added or relabelled, a pod gone), and bound to a node as soon as one fits.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

__all__ = ["admit", "node_object", "place", "schedule_pending"]

Obj = dict[str, Any]

# what a GKE e2-standard-4 node offers to pods (allocatable, after system reservations)
NODE_ALLOCATABLE = {"cpu": "3920m", "memory": "13484424Ki", "pods": "110", "ephemeral-storage": "47060071478"}


def node_object(name: str) -> Obj:
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": name,
        "node.kubernetes.io/instance-type": "e2-standard-4",
        "cloud.google.com/gke-nodepool": "default-pool",
        "topology.kubernetes.io/region": "us-central1",
        "topology.kubernetes.io/zone": "us-central1-a",
    }
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"providerID": f"gce://testbed/us-central1-a/{name}"},
        "status": {
            "capacity": {"cpu": "4", "memory": "16393220Ki", "pods": "110"},
            "allocatable": dict(NODE_ALLOCATABLE),
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                }
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.33.0-gke.1000",
                "architecture": "amd64",
                "operatingSystem": "linux",
                "containerRuntimeVersion": "containerd://1.7.24",
            },
        },
    }


_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
}


def quantity(text: Any) -> float:
    """A resource.Quantity as a number (cores for CPU, bytes for memory)."""
    raw = str(text).strip()
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", raw)
    if not m:
        raise ValueError(f"quantities must match the regular expression: {raw!r}")
    value = float(m.group(1))
    unit = m.group(2)
    if unit == "m":
        return value / 1000
    return value * _SUFFIX.get(unit or "", 1)


def _requests(spec: Obj) -> dict[str, float]:
    total: dict[str, float] = {}
    for c in spec.get("containers") or []:
        for res, value in (((c.get("resources") or {}).get("requests")) or {}).items():
            total[res] = total.get(res, 0.0) + quantity(value)
    # init containers run one at a time: the pod needs the largest of them, if more than the app's
    for c in spec.get("initContainers") or []:
        for res, value in (((c.get("resources") or {}).get("requests")) or {}).items():
            total[res] = max(total.get(res, 0.0), quantity(value))
    return total


def place(spec: Obj, nodes: list[Obj], running: list[Obj], *, pick: int = 0) -> tuple[str | None, str]:
    """(node name, "") when the pod fits somewhere, else (None, the FailedScheduling message)."""
    if not nodes:
        return None, "no nodes available to schedule pods"
    selector = spec.get("nodeSelector") or {}
    wanted = _requests(spec)
    mismatch = insufficient = 0
    short: dict[str, int] = {}
    fits: list[str] = []
    for node in nodes:
        labels = node["metadata"].get("labels") or {}
        if any(labels.get(k) != v for k, v in selector.items()):
            mismatch += 1
            continue
        allocatable = {
            k: quantity(v) for k, v in ((node.get("status") or {}).get("allocatable") or {}).items()
        }
        used: dict[str, float] = {}
        for pod in running:
            if (pod.get("spec") or {}).get("nodeName") == node["metadata"]["name"]:
                for res, value in _requests(pod.get("spec") or {}).items():
                    used[res] = used.get(res, 0.0) + value
        lacking = [
            res
            for res in ("cpu", "memory")
            if wanted.get(res, 0.0) > allocatable.get(res, 0.0) - used.get(res, 0.0)
        ]
        if lacking:
            insufficient += 1
            for res in lacking:
                short[res] = short.get(res, 0) + 1
            continue
        fits.append(node["metadata"]["name"])
    if fits:
        return fits[pick % len(fits)], ""
    n = len(nodes)
    reasons = []
    for res in sorted(short):
        reasons.append(f"{short[res]} Insufficient {res}")
    if mismatch:
        reasons.append(f"{mismatch} node(s) didn't match Pod's node affinity/selector")
    preemption = (
        f"{n} No preemption victims found for incoming pod"
        if insufficient and not mismatch
        else f"{n} Preemption is not helpful for scheduling"
    )
    return (
        None,
        f"0/{n} nodes are available: {', '.join(sorted(reasons))}. preemption: 0/{n} nodes are available: {preemption}.",
    )


def admit(pod: Obj, service_accounts: set[str]) -> str | None:
    """None when admission lets the pod be created, else the refusal (after `Error creating: `)."""
    meta = pod["metadata"]
    ns = meta.get("namespace", "default")
    sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    if sa in service_accounts:
        return None
    name = meta.get("generateName") or meta.get("name", "")
    return (
        f'pods "{name}" is forbidden: error looking up service account {ns}/{sa}: '
        f'serviceaccount "{sa}" not found'
    )


async def create_scheduled(store: Any, events: Any, pod: Obj, node_names: list[str], *, pick: int = 0) -> Obj:
    """Create `pod` bound to a node that fits it, or Pending/Unschedulable with a FailedScheduling event.

    `store` is the controllers' StoreView, `events` their EventRecorder; `node_names` stand in for
    Node objects in a store that has none.
    """
    nodes = await store.list("nodes") or [node_object(n) for n in node_names]
    running = [
        p
        for p in await store.list("pods")
        if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]
    node, why = place(pod.get("spec") or {}, nodes, running, pick=pick)
    if node is not None:
        pod["spec"]["nodeName"] = node
        return dict(await store.create("pods", pod))
    pod["spec"].pop("nodeName", None)
    pod["status"] = {
        "phase": "Pending",
        "qosClass": pod.get("status", {}).get("qosClass", "BestEffort"),
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": why,
                "lastProbeTime": None,
                "lastTransitionTime": pod["metadata"].get("creationTimestamp"),
            }
        ],
    }
    created = dict(await store.create("pods", pod))
    await events.record(created, "FailedScheduling", why, component="default-scheduler", warning=True)
    return created


def _unscheduled(pod: Obj) -> bool:
    meta = pod.get("metadata") or {}
    return (
        not (pod.get("spec") or {}).get("nodeName")
        and not meta.get("deletionTimestamp")
        and (pod.get("status") or {}).get("phase", "Pending") == "Pending"
    )


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tried(pod: Obj) -> bool:
    return any(c.get("type") == "PodScheduled" for c in (pod.get("status") or {}).get("conditions") or [])


async def schedule_pending(store: Any, events: Any, node_names: list[str], *, retry: bool = True) -> int:
    """Schedule the pods no node has yet, as kube-scheduler does; the number bound.

    With `retry` False only pods never tried (a pod created straight through the API, not by a
    controller here) are taken; with it True every Pending pod is tried again, which is what the real
    scheduler does on a cluster event that may let one fit (a node added or relabelled, a pod gone).
    A pod that fits is bound (spec.nodeName set, PodScheduled True) and its node's kubelet starts it;
    one that does not keeps PodScheduled False with the scheduler's message (updated when the reason
    changed) and gets another FailedScheduling, which the event recorder counts like the real one.
    """
    nodes = await store.list("nodes") or [node_object(n) for n in node_names]
    pods = await store.list("pods")
    running = [
        p
        for p in pods
        if (p.get("spec") or {}).get("nodeName")
        and (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
    ]
    bound = 0
    for pod in sorted(pods, key=lambda p: str(p["metadata"].get("creationTimestamp") or "")):
        if not _unscheduled(pod) or (not retry and _tried(pod)):
            continue
        meta = pod["metadata"]
        ns, name = meta.get("namespace", "default"), meta["name"]
        node, why = place(pod.get("spec") or {}, nodes, running, pick=len(name))
        if node is None:
            conds = (pod.get("status") or {}).get("conditions") or []
            if not any(c.get("type") == "PodScheduled" and c.get("message") == why for c in conds):

                def unschedulable(obj: Obj, why: str = why) -> None:
                    status = obj.setdefault("status", {})
                    status.setdefault("phase", "Pending")
                    status.setdefault("qosClass", "BestEffort")
                    status["conditions"] = [
                        c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"
                    ] + [
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": why,
                            "lastProbeTime": None,
                            "lastTransitionTime": _stamp(),
                        }
                    ]

                if await store.update("pods", ns, name, unschedulable, subresource="status") is None:
                    continue
            await events.record(pod, "FailedScheduling", why, component="default-scheduler", warning=True)
            continue

        def scheduled(obj: Obj) -> None:
            status = obj.setdefault("status", {})
            status.setdefault("phase", "Pending")
            status["conditions"] = [
                c for c in status.get("conditions") or [] if c.get("type") != "PodScheduled"
            ] + [
                {
                    "type": "PodScheduled",
                    "status": "True",
                    "lastProbeTime": None,
                    "lastTransitionTime": _stamp(),
                }
            ]

        def bind(obj: Obj, node: str = node) -> None:
            obj["spec"]["nodeName"] = node

        # what the binding subresource does: the condition first, so the kubelet sees a scheduled pod
        if await store.update("pods", ns, name, scheduled, subresource="status") is None:
            continue
        placed = await store.update("pods", ns, name, bind)
        if placed is not None:
            running.append(placed)
            bound += 1
    return bound
