"""Run a Kubernetes Job to its end: replace a finished one of the same name, watch it, read its pod's log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bot.adapters.diagnosis import UNSCHEDULABLE_GRACE, scheduling_hint, unschedulable
from bot.adapters.kube import JSON, ClusterClient, KubeConflict, KubeNotFound
from bot.errors import BotError, PermanentError
from bot.logs import redact

log = logging.getLogger(__name__)


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
    stuck_grace: float = UNSCHEDULABLE_GRACE,
) -> JobRun:
    """Create `job` (replacing a finished one of the same name), watch it to Complete/Failed, read the logs
    of its last `max_pods` pods (a retried pod can hide the first failure).

    A Job that cannot progress (pod refused, unschedulable for `stuck_grace` s, init container failed)
    fails at once with the cause and its fix, not at `limit`."""
    ns = str(job["metadata"]["namespace"])
    name = str(job["metadata"]["name"])
    await delete_finished(client, ns, name, what=what)
    try:
        created = await client.call(f"create job {ns}/{name}", client.batch.create_namespaced_job, ns, job)
    except KubeConflict:
        # the fixed Job name is the cluster-wide guard: someone created it between our delete and create
        raise PermanentError(
            f"a {what} Job {name} is already running in {client.context}",
            hint="Another run holds the Job name; wait for it to finish.",
        ) from None
    uid = str((created.get("metadata") or {}).get("uid") or "")

    async def follow() -> JSON:
        async with contextlib.aclosing(
            client.watch(
                f"job {ns}/{name}",
                client.batch.list_namespaced_job,
                ns,
                field_selector=f"metadata.name={name}",
            )
        ) as events:
            async for kind, obj in events:
                if kind == "DELETED":
                    raise PermanentError(f"the {what} Job {name} was deleted while running")
                if on_update is not None:
                    await on_update(obj)
                if finished(obj):
                    return obj
        raise PermanentError(f"the watch of Job {name} ended")  # pragma: no cover - watch() reconnects

    watcher = asyncio.create_task(follow(), name=f"watch job {name}")
    stuck = asyncio.create_task(
        watch_stuck(client, ns, name, uid, what=what, grace=stuck_grace), name=f"stuck job {name}"
    )
    done: set[asyncio.Task[Any]] = set()
    try:
        async with asyncio.timeout(limit):
            done, _ = await asyncio.wait({watcher, stuck}, return_when=asyncio.FIRST_COMPLETED)
    except TimeoutError:
        pod, log = await read_log(client, ns, name, container, max_pods=max_pods, uid=uid)
        raise PermanentError(
            f"the {what} Job {name} did not finish within {limit:.0f}s",
            hint=f"Look at its pods (kubectl -n {ns} logs job/{name}). Last lines:\n{log[-1500:]}",
        ) from None
    finally:
        for task in (watcher, stuck):
            task.cancel()
        await asyncio.gather(watcher, stuck, return_exceptions=True)
    if watcher not in done:
        # the Job would sit there (or retry the same failure) until someone deletes it: do it now, so
        # the next run can take the name, then say why
        with contextlib.suppress(BotError):
            await client.call(
                f"delete job {ns}/{name}",
                client.batch.delete_namespaced_job,
                name,
                ns,
                propagation_policy="Background",
            )
        stuck.result()  # raises the cause found (watch_stuck never returns)
        raise AssertionError("unreachable")  # pragma: no cover
    final = watcher.result()  # raises what the watch raised
    pod, log = await read_log(client, ns, name, container, max_pods=max_pods, uid=uid)
    return JobRun(final, pod, log)


def _failed_init(pod: JSON) -> tuple[str, JSON, bool] | None:
    """(init container, its failed run, whether that run is the previous one) when one failed.

    Under restartPolicy OnFailure the kubelet runs a failed init container again after a back-off
    (Init:CrashLoopBackOff): the failure is then its lastState, and its log the `previous` one.
    """
    for cs in (pod.get("status") or {}).get("initContainerStatuses") or []:
        state = cs.get("state") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        term = state.get("terminated") or last
        if term and term.get("exitCode") not in (None, 0):
            return str(cs.get("name")), dict(term), "terminated" not in state
    return None


def create_hint(message: str) -> str:
    m = re.search(r"error looking up service account ([^/\s]+)/([^:\s]+)", message)
    if m:
        return (
            f"Create the service account {m.group(2)} in namespace {m.group(1)} (bound to the build's "
            "Google service account through Workload Identity), or set the serviceAccountName the cluster has."
        )
    if "exceeded quota" in message:
        return "The namespace's ResourceQuota is used up: free some quota or raise it."
    return "Fix what the message names (kubectl describe job) and retry."


async def watch_stuck(
    client: ClusterClient, ns: str, name: str, uid: str, *, what: str, grace: float, every: float = 0.5
) -> None:
    """Raise as soon as the Job cannot make progress by itself, instead of letting it sit until its timeout.

    GKE leaves such a Job waiting forever: admission refusing its pod (FailedCreate on the Job), a pod
    the scheduler cannot place for `grace` seconds (autoscaling would have acted by then), a failed init
    container (the main container never starts).
    """
    pending_since: dict[str, float] = {}
    while True:
        await asyncio.sleep(every)
        try:
            await _check_stuck(client, ns, name, uid, what=what, grace=grace, pending_since=pending_since)
        except JobStuck:
            raise
        except BotError as e:
            # a failed look is no diagnosis: the watch carries on and the next look may succeed
            log.info("could not check Job %s for a stuck pod: %s", name, e)


class JobStuck(PermanentError):
    """The Job cannot make progress by itself; the message says why and the hint what to do."""


async def stuck_cause(client: ClusterClient, ns: str, name: str, uid: str, *, what: str) -> JobStuck | None:
    """After a Job failed: the reason its pods could not run (refused, unplaced, init failure), if any."""
    try:
        await _check_stuck(client, ns, name, uid, what=what, grace=0.0, pending_since={})
    except JobStuck as e:
        return e
    except BotError:
        return None
    return None


async def _check_stuck(
    client: ClusterClient,
    ns: str,
    name: str,
    uid: str,
    *,
    what: str,
    grace: float,
    pending_since: dict[str, float],
) -> None:
    loop = asyncio.get_running_loop()
    if uid:
        events = await client.call(
            f"events of job {name}",
            client.core.list_namespaced_event,
            ns,
            field_selector=f"involvedObject.uid={uid}",
        )
        for ev in events.get("items") or []:
            if ev.get("type") == "Warning" and ev.get("reason") == "FailedCreate":
                message = str(ev.get("message") or "")
                raise JobStuck(
                    f"the {what} Job {name} in {client.context} cannot create its pod: {message}",
                    hint=create_hint(message),
                )
    for pod in await _job_pods(client, ns, name, uid):
        pod_name = str(pod["metadata"]["name"])
        why = unschedulable(pod)
        if why is not None:
            since = pending_since.setdefault(pod_name, loop.time())
            if loop.time() - since >= grace:
                raise JobStuck(
                    f"the {what} Job {name}'s pod {pod_name} cannot be scheduled in {client.context}: {why}",
                    hint=scheduling_hint(why, pod),
                )
        failed = _failed_init(pod)
        if failed is not None:
            container, term, previous = failed
            text = ""
            # the failed run's log; a restarted one's is `previous`, unless the kubelet rotated it not yet
            for prev in (True, False) if previous else (False,):
                try:
                    text = await client.text(
                        f"log of {pod_name}",
                        client.core.read_namespaced_pod_log,
                        pod_name,
                        ns,
                        container=container,
                        previous=prev,
                    )
                except BotError:
                    continue
                if text.strip():
                    break
            tail = "\n".join(redact(text).rstrip().splitlines()[-5:]) or str(term.get("message") or "")
            raise JobStuck(
                f"the {what} Job {name}'s init container {container} failed "
                f"(exit code {term.get('exitCode')}, {term.get('reason') or 'Error'}), so it never started",
                hint=f"Its log:\n{tail}" if tail else "Read it: kubectl logs -c " + container,
            )


async def _job_pods(client: ClusterClient, ns: str, name: str, uid: str) -> list[JSON]:
    """This run's pods (by the Job's uid, not its reused name), without those being deleted."""
    selector = f"batch.kubernetes.io/controller-uid={uid}" if uid else f"job-name={name}"
    listing = await client.call(
        f"pods of job {name}", client.core.list_namespaced_pod, ns, label_selector=selector
    )
    return [
        p
        for p in listing.get("items") or []
        if not (p.get("metadata") or {}).get("deletionTimestamp")
        and (
            not uid
            or any(ref.get("uid") == uid for ref in (p.get("metadata") or {}).get("ownerReferences") or [])
        )
    ]


async def read_log(
    client: ClusterClient, ns: str, name: str, container: str, *, max_pods: int = 1, uid: str = ""
) -> tuple[str | None, str]:
    """The logs of the Job's last `max_pods` pods, oldest first, and the newest pod's name.

    With `uid`, only that Job's pods count: a Job of the same name run before may still have pods
    Terminating (GKE deletes them after their grace period), and their log is not this run's.
    Redacted here, before anything parses them into messages: golang-migrate may print its DSN with
    the password (a URL parse error quotes it whole), and these lines reach Slack, the ledger and logs.
    """
    pods = sorted(
        await _job_pods(client, ns, name, uid),
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
