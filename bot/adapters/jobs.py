"""Run a Kubernetes Job to its end: replace a finished one of the same name, watch it, read its pod's log."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bot.adapters.kube import JSON, ClusterClient, KubeConflict, KubeNotFound
from bot.errors import BotError, PermanentError
from bot.logs import redact


def condition(job: JSON, kind: str) -> JSON | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def finished(job: JSON) -> bool:
    return condition(job, "Complete") is not None or condition(job, "Failed") is not None


@dataclass(frozen=True)
class JobRun:
    job: JSON
    pod: str | None
    log: str

    @property
    def succeeded(self) -> bool:
        return condition(self.job, "Complete") is not None

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.rstrip().splitlines()[-lines:])


async def delete_finished(
    client: ClusterClient, ns: str, name: str, *, what: str, limit: float = 30.0
) -> None:
    """Delete a finished Job of that name and wait until it is gone; an unfinished one means someone is running."""
    try:
        previous = await client.call(f"job {ns}/{name}", client.batch.read_namespaced_job, name, ns)
    except KubeNotFound:
        return
    if not finished(previous):
        raise PermanentError(
            f"a {what} Job {name} is still running in {client.context}",
            hint=f"Wait for it (kubectl -n {ns} get job {name}) and retry.",
        )
    with contextlib.suppress(KubeNotFound):
        await client.call(
            f"delete job {ns}/{name}",
            client.batch.delete_namespaced_job,
            name,
            ns,
            propagation_policy="Background",
        )
    async with asyncio.timeout(limit):
        while True:
            try:
                await client.call(f"job {ns}/{name}", client.batch.read_namespaced_job, name, ns)
            except KubeNotFound:
                return
            await asyncio.sleep(0.1)


async def run_job(
    client: ClusterClient,
    job: JSON,
    *,
    container: str,
    what: str,
    limit: float,
    on_update: Callable[[JSON], Awaitable[None]] | None = None,
    max_pods: int = 1,
) -> JobRun:
    """Create `job` (replacing a finished one of the same name), watch it to Complete/Failed, read the logs
    of its last `max_pods` pods (a retried pod can hide the first failure)."""
    ns = str(job["metadata"]["namespace"])
    name = str(job["metadata"]["name"])
    await delete_finished(client, ns, name, what=what)
    try:
        await client.call(f"create job {ns}/{name}", client.batch.create_namespaced_job, ns, job)
    except KubeConflict:
        # the fixed Job name is the cluster-wide guard: someone created it between our delete and create
        raise PermanentError(
            f"a {what} Job {name} is already running in {client.context}",
            hint="Another run holds the Job name; wait for it to finish.",
        ) from None
    final: JSON | None = None
    try:
        async with (
            asyncio.timeout(limit),
            contextlib.aclosing(
                client.watch(
                    f"job {ns}/{name}",
                    client.batch.list_namespaced_job,
                    ns,
                    field_selector=f"metadata.name={name}",
                )
            ) as events,
        ):
            async for kind, obj in events:
                if kind == "DELETED":
                    raise PermanentError(f"the {what} Job {name} was deleted while running")
                if on_update is not None:
                    await on_update(obj)
                if finished(obj):
                    final = obj
                    break
    except TimeoutError:
        pod, log = await read_log(client, ns, name, container, max_pods=max_pods)
        raise PermanentError(
            f"the {what} Job {name} did not finish within {limit:.0f}s",
            hint=f"Look at its pods (kubectl -n {ns} logs job/{name}). Last lines:\n{log[-1500:]}",
        ) from None
    if final is None:  # pragma: no cover - watch() reconnects until cancelled
        raise PermanentError(f"the watch of Job {name} ended")
    pod, log = await read_log(client, ns, name, container, max_pods=max_pods)
    return JobRun(final, pod, log)


async def read_log(
    client: ClusterClient, ns: str, name: str, container: str, *, max_pods: int = 1
) -> tuple[str | None, str]:
    """The logs of the Job's last `max_pods` pods, oldest first, and the newest pod's name.

    Redacted here, before anything parses them into messages: golang-migrate may print its DSN with
    the password (a URL parse error quotes it whole), and these lines reach Slack, the ledger and logs.
    """
    listing = await client.call(
        f"pods of job {name}", client.core.list_namespaced_pod, ns, label_selector=f"job-name={name}"
    )
    pods = sorted(
        listing.get("items") or [],
        key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""),
    )[-max_pods:]
    if not pods:
        return None, ""
    parts: list[str] = []
    for p in pods:
        pod = str(p["metadata"]["name"])
        try:
            text = await client.text(
                f"log of {pod}", client.core.read_namespaced_pod_log, pod, ns, container=container
            )
        except BotError as e:
            text = f"error: could not read the log of {pod}: {e}\n"
        parts.append(text if len(pods) == 1 else f"--- pod {pod}\n{text}")
    text = "".join(part if part.endswith("\n") else part + "\n" for part in parts)
    return str(pods[-1]["metadata"]["name"]), redact(text)
