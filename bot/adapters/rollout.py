"""Watch Deployments roll out, decide like `kubectl rollout status`, and fail fast on pods that cannot start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from bot.adapters.diagnosis import (
    FAIL_FAST_REASONS,
    UNSCHEDULABLE_GRACE,
    Diagnoser,
    Diagnosis,
    failing_reason,
    unschedulable,
)
from bot.adapters.kube import JSON, ClusterClient
from bot.errors import PermanentError, first_failure

log = logging.getLogger(__name__)


class RolloutPhase(StrEnum):
    WAITING = "waiting"
    FAILED = "failed"
    DONE = "done"


@dataclass(frozen=True)
class RolloutStatus:
    phase: RolloutPhase
    message: str
    updated: int
    available: int
    total: int


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def rollout_status(deployment: JSON) -> RolloutStatus:
    """The decision `kubectl rollout status` makes for a Deployment, in its order."""
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    name = meta.get("name", "?")
    replicas = _int(spec.get("replicas", 1))
    updated = _int(status.get("updatedReplicas"))
    available = _int(status.get("availableReplicas"))
    current = _int(status.get("replicas"))

    def st(phase: RolloutPhase, message: str) -> RolloutStatus:
        return RolloutStatus(phase, message, updated, available, replicas)

    if _int(meta.get("generation")) > _int(status.get("observedGeneration")):
        return st(RolloutPhase.WAITING, "Waiting for deployment spec update to be observed...")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return st(RolloutPhase.FAILED, f'deployment "{name}" exceeded its progress deadline')
    if updated < replicas:
        return st(
            RolloutPhase.WAITING,
            f'Waiting for deployment "{name}" rollout to finish: {updated} out of {replicas} new replicas have been updated...',
        )
    if current > updated:
        return st(
            RolloutPhase.WAITING,
            f'Waiting for deployment "{name}" rollout to finish: {current - updated} old replicas are pending termination...',
        )
    if available < updated:
        return st(
            RolloutPhase.WAITING,
            f'Waiting for deployment "{name}" rollout to finish: {available} of {updated} updated replicas are available...',
        )
    return st(RolloutPhase.DONE, f'deployment "{name}" successfully rolled out')


def template_images(deployment: JSON) -> dict[str, str]:
    """Container name -> image of the Deployment's pod template."""
    containers = (((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers")
    return {str(c.get("name")): str(c.get("image")) for c in containers or []}


def is_new_pod(pod: JSON, deployment: JSON) -> bool:
    """A pod of the current template (the new ReplicaSet): its containers run the template's images.

    The bot changes nothing but images, so matching images identifies the new pod-template-hash without
    reading ReplicaSets.
    """
    want = template_images(deployment)
    have = {str(c.get("name")): str(c.get("image")) for c in (pod.get("spec") or {}).get("containers") or []}
    return bool(want) and all(have.get(n) == img for n, img in want.items())


def being_deleted(pod: JSON) -> bool:
    """A pod GKE is stopping (Terminating: deletionTimestamp set): no longer part of any rollout."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def pod_ready(pod: JSON) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


@dataclass(frozen=True)
class RolloutProgress:
    deployment: str
    ready: int
    total: int
    message: str


ProgressCallback = Callable[[RolloutProgress], Awaitable[None]]


@dataclass(frozen=True)
class RolloutResult:
    deployment: str
    images: Mapping[str, str]
    ready: int
    total: int
    seconds: float
    pods: tuple[str, ...] = field(default=())


class RolloutFailed(PermanentError):
    """The rollout cannot succeed; carries the diagnosis when one was made."""

    def __init__(self, message: str, *, deployment: str, diagnosis: Diagnosis | None = None) -> None:
        hint = f"{diagnosis.cause}. Fix: {diagnosis.fix}" if diagnosis else None
        super().__init__(message, hint=hint)
        self.deployment = deployment
        self.diagnosis = diagnosis


async def _pump(
    queue: asyncio.Queue[tuple[str, str, JSON]], tag: str, events: AsyncGenerator[tuple[str, JSON]]
) -> None:
    async with contextlib.aclosing(events) as stream:
        async for kind, obj in stream:
            await queue.put((tag, kind, obj))


async def watch_rollout(
    client: ClusterClient,
    namespace: str,
    name: str,
    *,
    diagnoser: Diagnoser,
    give_up_after: float,
    progress: ProgressCallback | None = None,
    fail_fast: bool = True,
    unschedulable_grace: float = UNSCHEDULABLE_GRACE,
) -> RolloutResult:
    """Wait until Deployment `name` is rolled out; raise RolloutFailed with a diagnosis as soon as it cannot be.

    The first ErrImagePull / ImagePullBackOff / InvalidImageName / CrashLoopBackOff on a pod of the NEW template
    ends the wait (`fail_fast`): Argo CD keeps such an app Progressing for the whole progress deadline.
    So does a new pod the scheduler has left Pending (FailedScheduling) for `unschedulable_grace` seconds:
    the scheduler places it by itself if a node frees up or joins in that time, otherwise it would sit
    there until the progress deadline.
    `give_up_after` is the configurable overall limit; it lives here rather than in the engine because, when
    it expires, the pods that are not Ready are still diagnosed for the report.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deployment = await client.read_deployment(namespace, name)
    match = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in sorted(match.items()))
    queue: asyncio.Queue[tuple[str, str, JSON]] = asyncio.Queue()

    deploy_events = client.watch(
        f"deployment {namespace}/{name}",
        client.apps.list_namespaced_deployment,
        namespace,
        field_selector=f"metadata.name={name}",
    )
    pod_events = client.watch(
        f"pods of {namespace}/{name}", client.core.list_namespaced_pod, namespace, label_selector=selector
    )
    tasks = [
        asyncio.create_task(_pump(queue, "deploy", deploy_events), name=f"rollout-watch-deploy-{name}"),
        asyncio.create_task(_pump(queue, "pod", pod_events), name=f"rollout-watch-pods-{name}"),
    ]
    pods: dict[str, JSON] = {}
    last_progress: tuple[int, int] | None = None
    # new pods the scheduler could not place, and since when (the loop's clock)
    unplaced: dict[str, float] = {}
    status = rollout_status(deployment)
    try:
        async with asyncio.timeout(give_up_after):
            while True:
                if fail_fast and unplaced:
                    stuck = min(unplaced, key=unplaced.__getitem__)
                    wait: float | None = max(unplaced[stuck] + unschedulable_grace - loop.time(), 0.0)
                else:
                    stuck, wait = "", None
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait([get, *tasks], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    get.cancel()
                    # still Pending after the grace: nothing will place it before the progress deadline
                    pod = pods[stuck]
                    raise RolloutFailed(
                        f"rollout of {name} in {client.context} failed: pod {stuck} cannot be scheduled: "
                        f"{unschedulable(pod)}",
                        deployment=name,
                        diagnosis=await diagnoser.diagnose(client, pod),
                    )
                if get not in done:
                    get.cancel()
                    for t in done:
                        t.result()  # a watch that died raises its error here
                    raise PermanentError(f"the watch of {namespace}/{name} ended unexpectedly")
                tag, kind, obj = get.result()
                if tag == "deploy":
                    if kind != "DELETED":
                        deployment = obj
                elif kind == "DELETED" or being_deleted(obj):
                    # a Terminating pod still reports Ready for its grace period: it counts for nothing
                    pods.pop(str(obj["metadata"]["name"]), None)
                    unplaced.pop(str(obj["metadata"]["name"]), None)
                else:
                    pod_name = str(obj["metadata"]["name"])
                    pods[pod_name] = obj
                    if unschedulable(obj) is not None and is_new_pod(obj, deployment):
                        unplaced.setdefault(pod_name, loop.time())
                    else:
                        unplaced.pop(pod_name, None)  # placed (a node joined or freed up), or an old pod
                    reason = failing_reason(obj)
                    if (
                        fail_fast
                        and reason
                        and reason[0] in FAIL_FAST_REASONS
                        and is_new_pod(obj, deployment)
                    ):
                        diagnosis = await diagnoser.diagnose(client, obj)
                        raise RolloutFailed(
                            f"rollout of {name} in {client.context} failed: pod {obj['metadata']['name']} "
                            f"is in {reason[0]}",
                            deployment=name,
                            diagnosis=diagnosis,
                        )
                status = rollout_status(deployment)
                # progress counts Ready pods of the NEW template: the status counters still show the old
                # ReplicaSet's pods until the controller has observed the new generation
                ready_new = sum(1 for p in pods.values() if is_new_pod(p, deployment) and pod_ready(p))
                if progress is not None and (ready_new, status.total) != last_progress:
                    last_progress = (ready_new, status.total)
                    await progress(RolloutProgress(name, ready_new, status.total, status.message))
                if status.phase is RolloutPhase.DONE:
                    # the Deployment can report done before the last pod's Ready event reaches our watch
                    if progress is not None and last_progress != (status.total, status.total):
                        await progress(RolloutProgress(name, status.total, status.total, status.message))
                    new = tuple(sorted(n for n, p in pods.items() if is_new_pod(p, deployment)))
                    return RolloutResult(
                        name,
                        template_images(deployment),
                        status.available,
                        status.total,
                        loop.time() - started,
                        new,
                    )
                if status.phase is RolloutPhase.FAILED:
                    raise RolloutFailed(
                        f"rollout of {name} in {client.context} failed: {status.message}",
                        deployment=name,
                        diagnosis=await _diagnose_any(client, diagnoser, pods, deployment),
                    )
    except TimeoutError:
        raise RolloutFailed(
            f"rollout of {name} in {client.context} did not finish within {give_up_after:.0f}s: {status.message}",
            deployment=name,
            diagnosis=await _diagnose_any(client, diagnoser, pods, deployment),
        ) from None
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


async def _diagnose_any(
    client: ClusterClient, diagnoser: Diagnoser, pods: Mapping[str, JSON], deployment: JSON
) -> Diagnosis | None:
    for pod in pods.values():
        if is_new_pod(pod, deployment) and not pod_ready(pod):
            try:
                found = await diagnoser.diagnose(client, pod)
            except PermanentError:
                continue
            if found is not None:
                return found
    return None


async def watch_rollouts(
    client: ClusterClient,
    namespace: str,
    names: Sequence[str],
    *,
    diagnoser: Diagnoser,
    give_up_after: float,
    progress: ProgressCallback | None = None,
    fail_fast: bool = True,
) -> list[RolloutResult]:
    """Watch several Deployments at once; the first failure cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(
                    watch_rollout(
                        client,
                        namespace,
                        n,
                        diagnoser=diagnoser,
                        give_up_after=give_up_after,
                        progress=progress,
                        fail_fast=fail_fast,
                    ),
                    name=f"rollout-{client.context}-{n}",
                )
                for n in names
            ]
    except BaseExceptionGroup as eg:
        # callers expect the failure itself (RolloutFailed with its diagnosis), not a group
        raise first_failure(eg) from None
    return [t.result() for t in tasks]
