"""Simulated control-plane machinery shared by the cluster's parts, and the Deployment controller.

The controllers work in-process on the Store of ONE cluster (never through the bot's code). Everything
is level-triggered: a change to an object schedules a reconcile of that object (coalesced per key), so
a burst of events costs one pass. Time is a parameter (`Timings`): tens of milliseconds in tests,
seconds in a demo. cluster.py wires this, kubelet.py, jobs.py and argocd.py to the Store's change feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from tests.testbed.kube.scheduler import create_scheduled
from tests.testbed.kube.store import Store, StoreError

if TYPE_CHECKING:
    from tests.testbed.kube.kubelet import EventRecorder

log = logging.getLogger("testbed.kube.controller")

POD_TEMPLATE_HASH = "pod-template-hash"
# kube's rand.SafeEncodeString alphabet: no vowels, no look-alike digits
_SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


@dataclasses.dataclass(frozen=True)
class Timings:
    """Every delay of the simulated cluster, in seconds (tests: tens of ms; demo: seconds)."""

    pull_delay: float = 0.02  # kubelet: "Pulling" → answer from the registry
    pull_backoff: float = 0.05  # first ImagePullBackOff wait; doubles up to pull_backoff_max
    pull_backoff_max: float = 0.4
    container_start: float = 0.02  # ContainerCreating → running
    ready_delay: float = 0.03  # running → Ready (readiness probe passes)
    crash_after: float = 0.03  # a crashing container runs this long before exiting 1
    crash_backoff: float = 0.05  # first CrashLoopBackOff wait; doubles up to crash_backoff_max
    crash_backoff_max: float = 0.4
    job_run: float = 0.03  # a Job container's run time
    job_retry_backoff: float = 0.03  # Job controller: wait before replacing a failed pod
    argo_reconcile: float = 0.02  # Argo CD: annotation/operation seen → work starts
    argo_sync: float = 0.03  # Argo CD: operation Running → manifests applied
    deadline_scale: float = 0.002  # multiplies spec.progressDeadlineSeconds (600 s → 1.2 s)
    termination: float = 0.05  # a deleted pod stays Terminating this long (its containers stopping)
    gc_delay: float = 0.02  # garbage collector: owner deleted → its dependents deleted
    http_timeout: float = 5.0  # kubelet → registry requests
    subprocess_timeout: float = 30.0  # git / kubectl kustomize

    @classmethod
    def fast(cls) -> Timings:
        return cls()

    @classmethod
    def demo(cls) -> Timings:
        """Slow enough for a person to watch a rollout happen in Slack."""
        return cls(
            pull_delay=1.0,
            pull_backoff=5.0,
            pull_backoff_max=40.0,
            container_start=1.0,
            ready_delay=2.0,
            crash_after=1.5,
            crash_backoff=5.0,
            crash_backoff_max=40.0,
            job_run=3.0,
            job_retry_backoff=2.0,
            argo_reconcile=1.0,
            argo_sync=1.5,
            deadline_scale=0.1,
            termination=2.0,
            gc_delay=0.5,
        )


# ----------------------------------------------------------------------------------------------- time


def now_rfc3339(when: dt.datetime | None = None) -> str:
    """Kubernetes metav1.Time: UTC, second resolution, `Z` suffix."""
    when = when or dt.datetime.now(dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def strictly_after(previous: str | None) -> str:
    """Now, but strictly newer than `previous` even within the same second.

    metav1.Time has second resolution; a client waiting for a newer reconciledAt must see it move.
    """
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    if previous:
        with contextlib.suppress(ValueError):
            prev = parse_rfc3339(previous)
            if now <= prev:
                now = prev + dt.timedelta(seconds=1)
    return now_rfc3339(now)


# ---------------------------------------------------------------------------------------- helpers


def rand_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(_SAFE_ALPHABET) for _ in range(n))


def template_hash(template: dict[str, Any]) -> str:
    """A stable pod-template-hash (the real one is FNV-32 of the template, safe-encoded)."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    return "".join(_SAFE_ALPHABET[b % len(_SAFE_ALPHABET)] for b in digest[:10])


def pod_is_ready(pod: dict[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


REVISION = "deployment.kubernetes.io/revision"


def replicaset_uid(dep: dict[str, Any], template_hash: str) -> str:
    """The uid of a Deployment's ReplicaSet for one template, known before the object is written."""
    d = hashlib.sha256(f"{dep['metadata'].get('uid')}/{template_hash}".encode()).hexdigest()
    return f"{d[:8]}-{d[8:12]}-{d[12:16]}-{d[16:20]}-{d[20:32]}"


def selector_string(match_labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))


def int_or_percent(value: Any, total: int, *, round_up: bool) -> int:
    if value is None:
        value = "25%"
    if isinstance(value, int):
        return value
    text = str(value)
    if text.endswith("%"):
        frac = total * int(text[:-1]) / 100
        return math.ceil(frac) if round_up else math.floor(frac)
    return int(text)


class StoreView:
    """The controllers' way into the Store: races with deletes are normal and read as None/False.

    The Store is synchronous and never awaits (each call is atomic on the event loop); these methods are
    async so every controller reads alike and a slower backend could be slotted in.
    """

    def __init__(self, store: Store) -> None:
        self.raw = store

    async def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.raw.get(resource, namespace, name)

    async def list(
        self, resource: str, namespace: str | None = None, *, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        items, _rv = self.raw.list(resource, namespace, label_selector=label_selector)
        return items

    async def create(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        return self.raw.create(resource, obj)

    async def update(
        self,
        resource: str,
        namespace: str,
        name: str,
        fn: Callable[[dict[str, Any]], None],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any] | None:
        """Read-modify-write; None when the object is gone."""
        try:
            return self.raw.update(resource, namespace, name, fn, subresource=subresource)
        except StoreError as e:
            if e.code == 404:
                return None
            raise

    async def delete(self, resource: str, namespace: str, name: str) -> bool:
        try:
            self.raw.delete(resource, namespace, name)
        except StoreError as e:
            if e.code == 404:
                return False
            raise
        return True

    async def set_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        self.raw.set_log(namespace, pod, container, text)

    async def rotate_log(self, namespace: str, pod: str, container: str) -> None:
        """A container restarted: its log becomes the `previous=true` one."""
        self.raw.rotate_log(namespace, pod, container)


class Supervisor:
    """Named background tasks, kept referenced, failures logged, cancelled together on stop."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException] = []

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.prefix}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.errors.append(exc)
            log.error("task %s failed", task.get_name(), exc_info=exc)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()


class KeyedWorker:
    """Runs `fn(key)` for scheduled keys, one pass at a time per key; events during a pass coalesce."""

    def __init__(self, sup: Supervisor, kind: str, fn: Callable[[tuple[str, str]], Awaitable[None]]) -> None:
        self._sup = sup
        self._kind = kind
        self._fn = fn
        self._running: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._timers: dict[tuple[str, str], asyncio.Task[Any]] = {}

    def schedule(self, key: tuple[str, str]) -> None:
        if key in self._running:
            self._dirty.add(key)
            return
        self._running[key] = self._sup.spawn(f"{self._kind}/{key[0]}/{key[1]}", self._loop(key))

    def schedule_after(self, key: tuple[str, str], delay: float) -> None:
        """A wake-up (e.g. a progress deadline); replaces the key's previous wake-up."""
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()

        async def wake() -> None:
            await asyncio.sleep(max(delay, 0.0))
            self._timers.pop(key, None)
            self.schedule(key)

        self._timers[key] = self._sup.spawn(f"{self._kind}-timer/{key[0]}/{key[1]}", wake())

    async def _loop(self, key: tuple[str, str]) -> None:
        try:
            while True:
                self._dirty.discard(key)
                try:
                    await self._fn(key)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    # keep going (a controller survives a bad object) but let tests see it
                    self._sup.errors.append(e)
                    log.exception("%s reconcile of %s/%s failed", self._kind, *key)
                if key not in self._dirty:
                    return
        finally:
            self._running.pop(key, None)


# ------------------------------------------------------------------------------ Deployment controller


class DeploymentController:
    """Rolls pod templates out like the real controller (RollingUpdate/Recreate) and writes the status
    `kubectl rollout status` reads: observedGeneration, replica counts, Available/Progressing.

    Pods carry `pod-template-hash` and an ownerReference to the ReplicaSet `<deployment>-<hash>`; the
    ReplicaSet objects are kept in step with the pods (revisions, replicas, status) rather than run by a
    controller of their own. Pods being deleted (Terminating) no longer count; minReadySeconds is 0, so
    Ready means available.
    """

    def __init__(
        self, store: StoreView, sup: Supervisor, timings: Timings, nodes: list[str], events: EventRecorder
    ) -> None:
        self.store = store
        self.timings = timings
        self.nodes = nodes
        self.events = events
        self.worker = KeyedWorker(sup, "deployment", self.reconcile)
        # monotonic time of the last progress per deployment: the deadline clock
        self._last_progress: dict[tuple[str, str], float] = {}

    def owner_of(self, pod: dict[str, Any]) -> tuple[str, str] | None:
        for ref in pod.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("kind") == "ReplicaSet":
                rs = str(ref.get("name", ""))
                return (pod["metadata"].get("namespace", "default"), rs.rsplit("-", 1)[0])
        return None

    async def reconcile(self, key: tuple[str, str]) -> None:
        ns, name = key
        dep = await self.store.get("deployments", ns, name)
        if dep is None:
            self._last_progress.pop(key, None)
            return
        if dep["metadata"].get("deletionTimestamp"):
            return  # being deleted (foreground): no new ReplicaSet or pod for it
        spec = dep.get("spec") or {}
        template = spec.get("template") or {}
        replicas = int(spec.get("replicas", 1))
        match = (spec.get("selector") or {}).get("matchLabels") or {}
        h = template_hash(template)
        rs_name = f"{name}-{h}"
        pods = await self.store.list("pods", ns, label_selector=selector_string(match)) if match else []
        pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        new = [p for p in pods if p["metadata"].get("labels", {}).get(POD_TEMPLATE_HASH) == h]
        old = [p for p in pods if p not in new]

        strategy = spec.get("strategy") or {}
        recreate = strategy.get("type") == "Recreate"
        ru = strategy.get("rollingUpdate") or {}
        surge = 0 if recreate else int_or_percent(ru.get("maxSurge"), replicas, round_up=True)
        unavail = replicas if recreate else int_or_percent(ru.get("maxUnavailable"), replicas, round_up=False)
        if surge == 0 and unavail == 0:
            unavail = 1
        min_available = max(replicas - unavail, 0)

        # The real controller's order per sync: reconcileNewReplicaSet, then reconcileOldReplicaSets.
        if len(new) > replicas:
            # replicas shrank: the new ReplicaSet loses its not-ready pods first
            excess = sorted(new, key=pod_is_ready)[: len(new) - replicas]
            for p in excess:
                await self.store.delete("pods", ns, p["metadata"]["name"])
                new.remove(p)
            await self._event(
                dep,
                "ScalingReplicaSet",
                f"Scaled down replica set {rs_name} to {replicas} from {len(new) + len(excess)}",
            )
        elif not (recreate and old):
            # scale up within maxSurge (Recreate waits for every old pod to be gone)
            to_create = max(min(replicas + surge - (len(new) + len(old)), replicas - len(new)), 0)
            for _ in range(to_create):
                new.append(await self._create_pod(dep, template, h, rs_name))
            if to_create:
                await self._event(
                    dep,
                    "ScalingReplicaSet",
                    f"Scaled up replica set {rs_name} to {len(new)} from {len(new) - to_create}",
                )

        doomed: list[dict[str, Any]] = []
        if recreate:
            doomed = list(old)
        elif old:
            # cleanupUnhealthyReplicas: not-ready old pods go first, within what availability allows
            new_unavailable = sum(not pod_is_ready(p) for p in new)
            budget = len(new) + len(old) - min_available - new_unavailable
            unhealthy = [p for p in old if not pod_is_ready(p)]
            doomed = unhealthy[: max(budget, 0)]
            # scaleDownOldReplicaSetsForRollingUpdate: then ready ones, keeping minAvailable (oldest first)
            available = sum(pod_is_ready(p) for p in new + old)
            healthy = sorted(
                (p for p in old if pod_is_ready(p)), key=lambda p: p["metadata"].get("creationTimestamp", "")
            )
            doomed += healthy[: max(available - min_available, 0)]
        by_rs: dict[str, int] = {}
        for p in doomed:
            await self.store.delete("pods", ns, p["metadata"]["name"])
            old.remove(p)
            old_rs = f"{name}-{p['metadata'].get('labels', {}).get(POD_TEMPLATE_HASH, '')}"
            by_rs[old_rs] = by_rs.get(old_rs, 0) + 1
        for old_rs, count in by_rs.items():
            left = sum(
                1
                for p in old
                if f"{name}-{p['metadata'].get('labels', {}).get(POD_TEMPLATE_HASH, '')}" == old_rs
            )
            await self._event(
                dep, "ScalingReplicaSet", f"Scaled down replica set {old_rs} to {left} from {left + count}"
            )

        await self._sync_replicasets(dep, template, h, match, new, old, replicas, surge)
        await self._write_status(key, dep, new, old, replicas, min_available, rs_name)

    async def _sync_replicasets(
        self,
        dep: dict[str, Any],
        template: dict[str, Any],
        h: str,
        match: dict[str, str],
        new: list[dict[str, Any]],
        old: list[dict[str, Any]],
        replicas: int,
        surge: int,
    ) -> None:
        """The ReplicaSet objects behind the pods: one per template, numbered by revision, scaled to their pods.

        `kubectl rollout history/undo` read them; the Deployment carries its current revision.
        """
        meta = dep["metadata"]
        ns, name = meta.get("namespace", "default"), meta["name"]
        owned = [
            rs
            for rs in await self.store.list("replicasets", ns)
            if any(ref.get("uid") == meta.get("uid") for ref in rs["metadata"].get("ownerReferences") or [])
        ]
        revisions = [int((rs["metadata"].get("annotations") or {}).get(REVISION, "0")) for rs in owned]
        top = max(revisions, default=0)
        current = next((rs for rs in owned if rs["metadata"]["name"] == f"{name}-{h}"), None)
        counts: dict[str, list[dict[str, Any]]] = {}
        for p in new + old:
            counts.setdefault(str(p["metadata"].get("labels", {}).get(POD_TEMPLATE_HASH, "")), []).append(p)
        annotations = {
            "deployment.kubernetes.io/desired-replicas": str(replicas),
            "deployment.kubernetes.io/max-replicas": str(replicas + surge),
        }
        if current is None:
            labels = {**((template.get("metadata") or {}).get("labels") or {}), POD_TEMPLATE_HASH: h}
            tmpl = json.loads(json.dumps(template))
            tmpl.setdefault("metadata", {})["labels"] = labels
            rs_obj = {
                "metadata": {
                    "name": f"{name}-{h}",
                    "namespace": ns,
                    "labels": labels,
                    "annotations": {**annotations, REVISION: str(top + 1)},
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "Deployment",
                            "name": name,
                            "uid": meta.get("uid"),
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": {
                    "replicas": len(new),
                    "selector": {"matchLabels": {**match, POD_TEMPLATE_HASH: h}},
                    "template": tmpl,
                },
            }
            try:
                current = self.store.raw.create("replicasets", rs_obj, uid=replicaset_uid(dep, h))
            except StoreError as e:
                if e.code != 409:
                    raise
            owned.append(current or rs_obj)
        elif int((current["metadata"].get("annotations") or {}).get(REVISION, "0")) < top:
            # rolling back to an older template makes its ReplicaSet the newest revision again

            def bump(rs: dict[str, Any]) -> None:
                rs["metadata"].setdefault("annotations", {})[REVISION] = str(top + 1)

            current = await self.store.update("replicasets", ns, f"{name}-{h}", bump)
        for rs in owned:
            rs_hash = rs["metadata"]["name"][len(name) + 1 :]
            pods = counts.get(rs_hash, [])
            ready = sum(pod_is_ready(p) for p in pods)
            want = len(pods)
            status = {
                "replicas": want,
                "fullyLabeledReplicas": want,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "observedGeneration": int(rs["metadata"].get("generation", 1)),
            }
            if not ready:
                del status["readyReplicas"], status["availableReplicas"]
            if (rs.get("spec") or {}).get("replicas") != want:

                def scale(obj: dict[str, Any], want: int = want) -> None:
                    obj["spec"]["replicas"] = want

                rs = await self.store.update("replicasets", ns, rs["metadata"]["name"], scale) or rs  # noqa: PLW2901
            if rs.get("status") != status:

                def put(obj: dict[str, Any], status: dict[str, Any] = status) -> None:
                    obj["status"] = status

                await self.store.update("replicasets", ns, rs["metadata"]["name"], put, subresource="status")
        revision = ((current or {}).get("metadata") or {}).get("annotations", {}).get(REVISION)
        if revision and (meta.get("annotations") or {}).get(REVISION) != revision:

            def note(obj: dict[str, Any]) -> None:
                obj["metadata"].setdefault("annotations", {})[REVISION] = revision

            await self.store.update("deployments", ns, name, note)

    async def _create_pod(
        self, dep: dict[str, Any], template: dict[str, Any], h: str, rs_name: str
    ) -> dict[str, Any]:
        meta = template.get("metadata") or {}
        labels = dict(meta.get("labels") or {})
        labels[POD_TEMPLATE_HASH] = h
        ns = dep["metadata"].get("namespace", "default")
        pod_spec = json.loads(json.dumps(template.get("spec") or {}))
        pod_spec.setdefault("restartPolicy", "Always")
        obj: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{rs_name}-{rand_suffix()}",
                "namespace": ns,
                "labels": labels,
                "annotations": dict(meta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": rs_name,
                        "uid": replicaset_uid(dep, h),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
            "status": {"phase": "Pending", "qosClass": "BestEffort"},
        }
        return await create_scheduled(
            self.store, self.events, obj, self.nodes, pick=secrets.randbelow(1 << 16)
        )

    async def _event(self, dep: dict[str, Any], reason: str, message: str) -> None:
        await self.events.record(dep, reason, message, component="deployment-controller", warning=False)

    async def _write_status(
        self,
        key: tuple[str, str],
        dep: dict[str, Any],
        new: list[dict[str, Any]],
        old: list[dict[str, Any]],
        replicas: int,
        min_available: int,
        rs_name: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        prev = dep.get("status") or {}
        generation = int(dep["metadata"].get("generation", 1))
        ready = sum(pod_is_ready(p) for p in new + old)
        counts = {
            "observedGeneration": generation,
            "replicas": len(new) + len(old),
            "updatedReplicas": len(new),
            "readyReplicas": ready,
            "availableReplicas": ready,
            # the controller's totalReplicas - availableReplicas, where the total sums the ReplicaSets'
            # spec.replicas: during a surge that is more than the Deployment's own replicas
            "unavailableReplicas": max(len(new) + len(old) - ready, 0),
        }
        progressed = any(prev.get(k, 0) != v for k, v in counts.items()) or key not in self._last_progress
        complete = len(new) == replicas and not old and ready >= replicas
        now = now_rfc3339()
        conds = {c["type"]: c for c in prev.get("conditions") or []}

        def cond(ctype: str, status: str, reason: str, message: str, *, progress: bool) -> dict[str, Any]:
            old_c = conds.get(ctype) or {}
            same = old_c.get("status") == status and old_c.get("reason") == reason
            return {
                "type": ctype,
                "status": status,
                "lastUpdateTime": old_c.get("lastUpdateTime", now) if same and not progress else now,
                "lastTransitionTime": old_c.get("lastTransitionTime", now)
                if old_c.get("status") == status
                else now,
                "reason": reason,
                "message": message,
            }

        if ready >= min_available:
            available = cond(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                progress=False,
            )
        else:
            available = cond(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                progress=False,
            )
        deadline = (
            float((dep.get("spec") or {}).get("progressDeadlineSeconds", 600)) * self.timings.deadline_scale
        )
        prev_prog = conds.get("Progressing") or {}
        if complete:
            self._last_progress[key] = loop.time()
            progressing = cond(
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{rs_name}" has successfully progressed.',
                progress=progressed,
            )
        elif progressed:
            self._last_progress[key] = loop.time()
            progressing = cond(
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                f'ReplicaSet "{rs_name}" is progressing.',
                progress=True,
            )
            self.worker.schedule_after(key, deadline + 0.001)
        elif prev_prog.get("reason") == "ProgressDeadlineExceeded":
            progressing = prev_prog
        elif loop.time() - self._last_progress.get(key, loop.time()) >= deadline:
            progressing = cond(
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                f'ReplicaSet "{rs_name}" has timed out progressing.',
                progress=True,
            )
        else:
            progressing = prev_prog or cond(
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                f'ReplicaSet "{rs_name}" is progressing.',
                progress=True,
            )
            remaining = deadline - (loop.time() - self._last_progress.get(key, loop.time()))
            self.worker.schedule_after(key, remaining + 0.001)
        status = {**counts, "conditions": [available, progressing]}
        if status == prev:
            return

        def put(obj: dict[str, Any]) -> None:
            obj["status"] = status

        await self.store.update("deployments", key[0], key[1], put, subresource="status")
