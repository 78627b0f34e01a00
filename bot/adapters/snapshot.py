"""Read-only snapshot of every env for the status report: live images, pods, Argo CD state, failing pods."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from bot.adapters.argocd import AppNotFound, ArgoCD
from bot.adapters.diagnosis import Diagnoser, Diagnosis, failing_reason, split_image
from bot.adapters.kube import JSON, ClusterClient, KubeClients, KubeNotFound
from bot.adapters.rollout import being_deleted, is_new_pod, pod_ready, template_images
from bot.errors import BotError
from bot.settings import Environment, Service

log = logging.getLogger(__name__)

_MAX_DIAGNOSED = 3  # failing pods diagnosed per service: the report needs one cause, not every replica


@dataclass(frozen=True)
class LastOperation:
    phase: str
    revision: str
    started_at: str
    finished_at: str
    initiated_by: str
    message: str


@dataclass(frozen=True)
class FailingPod:
    name: str
    reason: str
    diagnosis: Diagnosis | None


@dataclass(frozen=True)
class ServiceSnapshot:
    service: str
    deployment: str
    images: Mapping[str, str]
    tag: str | None
    ready: int
    total: int
    argo_sync: str
    argo_health: str
    argo_revision: str
    last_operation: LastOperation | None
    failing: tuple[FailingPod, ...] = ()
    problems: tuple[str, ...] = ()  # what could not be read (missing Deployment, missing Application)


@dataclass(frozen=True)
class EnvSnapshot:
    env: str
    services: tuple[ServiceSnapshot, ...] = ()
    error: str | None = None  # "unreachable: <reason>" when the cluster could not be read
    seconds: float = 0.0
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def reachable(self) -> bool:
        return self.error is None


def _last_operation(app: JSON) -> LastOperation | None:
    state = (app.get("status") or {}).get("operationState")
    if not state:
        return None
    op = state.get("operation") or {}
    return LastOperation(
        phase=str(state.get("phase") or ""),
        revision=str(
            (state.get("syncResult") or {}).get("revision") or (op.get("sync") or {}).get("revision") or ""
        ),
        started_at=str(state.get("startedAt") or ""),
        finished_at=str(state.get("finishedAt") or ""),
        initiated_by=str((op.get("initiatedBy") or {}).get("username") or ""),
        message=str(state.get("message") or ""),
    )


async def _failing_pods(
    client: ClusterClient, env: Environment, pods: Sequence[JSON], diagnoser: Diagnoser
) -> tuple[FailingPod, ...]:
    """The pods that fail or wait, in listing order, up to _MAX_DIAGNOSED of them diagnosed concurrently.

    Failing pods take the diagnosis slots first: each is a problem whatever its diagnosis says. A Pending pod
    is one only when its diagnosis finds a cause (otherwise it is being created and is left out), so it
    holds a slot only then; Pending pods are diagnosed in concurrent rounds until the slots are used up.
    """
    failing: list[tuple[int, str]] = []  # (position in the listing, reason)
    pending: list[int] = []
    for i, pod in enumerate(pods):
        fr = failing_reason(pod)
        if fr is not None:
            failing.append((i, fr[0]))
        elif (pod.get("status") or {}).get("phase") == "Pending":
            pending.append(i)

    async def diagnose(pod: JSON) -> Diagnosis | None:
        try:
            return await diagnoser.diagnose(client, pod)
        except BotError as e:
            log.info("could not diagnose %s in %s: %s", _name(pod), env.name, e)
            return None

    async def diagnose_all(positions: Sequence[int]) -> list[Diagnosis | None]:
        # a TaskGroup, not gather: when the snapshot's time limit cancels it, no diagnosis is left running
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(diagnose(pods[i]), name=f"diagnose-{env.name}-{_name(pods[i])}")
                for i in positions
            ]
        return [t.result() for t in tasks]

    found: dict[int, FailingPod] = {}
    first = failing[:_MAX_DIAGNOSED]
    diagnoses = await diagnose_all([i for i, _ in first])
    for (i, reason), diag in zip(first, diagnoses, strict=True):
        found[i] = FailingPod(_name(pods[i]), reason, diag)
    for i, reason in failing[_MAX_DIAGNOSED:]:
        found[i] = FailingPod(_name(pods[i]), reason, None)
    slots = _MAX_DIAGNOSED - len(first)
    while slots > 0 and pending:
        batch, pending = pending[:slots], pending[slots:]
        for i, diag in zip(batch, await diagnose_all(batch), strict=True):
            if diag is not None:
                found[i] = FailingPod(_name(pods[i]), "Pending", diag)
                slots -= 1
    return tuple(found[i] for i in sorted(found))


def _name(pod: JSON) -> str:
    return str((pod.get("metadata") or {}).get("name") or "")


async def _service(
    client: ClusterClient, env: Environment, service: Service, diagnoser: Diagnoser
) -> ServiceSnapshot:
    name = service.image  # Deployment funnelcake-<service>
    ns = env.namespace
    app_name = env.argocd.applications.get(service, f"funnelcake-{service.value}")
    problems: list[str] = []
    argo = ArgoCD(client, env.argocd.namespace, env_name=env.name)

    async def read_deploy() -> JSON | None:
        try:
            return await client.read_deployment(ns, name)
        except KubeNotFound:
            problems.append(f"Deployment {ns}/{name} not found")
            return None

    async def read_app() -> JSON | None:
        try:
            return await argo.get(app_name)
        except AppNotFound:
            problems.append(f"Argo CD application {app_name} not found")
            return None

    deploy, app = await asyncio.gather(read_deploy(), read_app())
    images = template_images(deploy) if deploy else {}
    # the service's own container, not a sidecar: named after the service, or running the service's image
    main_image = (
        images.get(service.value)
        or images.get(service.image)
        or next((i for i in images.values() if f"/{service.image}:" in i), "")
    )
    tag = split_image(main_image)[2] if main_image else None
    ready = total = 0
    failing: tuple[FailingPod, ...] = ()
    if deploy:
        total = int((deploy.get("spec") or {}).get("replicas", 1))
        match = ((deploy.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        pods = await client.call(
            f"pods of {ns}/{name}",
            client.core.list_namespaced_pod,
            ns,
            label_selector=",".join(f"{k}={v}" for k, v in sorted(match.items())),
        )
        # pods being deleted (Terminating) are neither ready capacity nor failures to report
        items = [p for p in pods.get("items") or [] if not being_deleted(p)]
        ready = sum(1 for p in items if is_new_pod(p, deploy) and pod_ready(p))
        failing = await _failing_pods(client, env, items, diagnoser)
    status = (app or {}).get("status") or {}
    return ServiceSnapshot(
        service=service.value,
        deployment=name,
        images=images,
        tag=tag,
        ready=ready,
        total=total,
        argo_sync=str((status.get("sync") or {}).get("status") or "Unknown"),
        argo_health=str((status.get("health") or {}).get("status") or "Unknown"),
        argo_revision=str((status.get("sync") or {}).get("revision") or ""),
        last_operation=_last_operation(app) if app else None,
        failing=failing,
        problems=tuple(problems),
    )


async def snapshot_env(
    client: ClusterClient, env: Environment, *, diagnoser: Diagnoser, limit: float = 20.0
) -> EnvSnapshot:
    """One env's snapshot; any failure to read the cluster becomes `unreachable: <reason>`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(limit):
            services = await asyncio.gather(*(_service(client, env, s, diagnoser) for s in Service))
    except TimeoutError:
        return EnvSnapshot(env.name, error=f"unreachable: no answer within {limit:.0f}s", seconds=limit)
    except BotError as e:
        return EnvSnapshot(env.name, error=f"unreachable: {e.message}", seconds=loop.time() - started)
    return EnvSnapshot(env.name, tuple(services), seconds=loop.time() - started)


async def snapshot_all(
    clients: KubeClients,
    envs: Sequence[Environment],
    *,
    diagnoser_for: Callable[[Environment], Diagnoser] | None = None,
    limit: float = 20.0,
) -> list[EnvSnapshot]:
    """All envs read concurrently, in the given order; one unreachable env does not hide the others."""

    async def one(env: Environment) -> EnvSnapshot:
        if env.kube_context not in clients:
            return EnvSnapshot(env.name, error=f"unreachable: no kube context {env.kube_context} configured")
        diagnoser = diagnoser_for(env) if diagnoser_for else Diagnoser(env, envs)
        return await snapshot_env(clients[env.kube_context], env, diagnoser=diagnoser, limit=limit)

    tasks = [asyncio.create_task(one(e), name=f"snapshot-{e.name}") for e in envs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
