"""Argo CD through its Application objects in each env's own cluster: hard refresh, then sync, watched to the end.

Argo CD quirks this relies on: the Application has no status subresource; the controller drops
the refresh annotation only after it has reconciled and written status.reconciledAt; a sync is requested by
setting top-level `operation`, and one patched while another is Running is silently dropped; right after the
patch the PREVIOUS operationState is still visible. A result counts only if operationState is no longer the
one read before the request and it ran our revision for our user. startedAt cannot tell them apart: it has
one-second resolution and comes from the controller's clock, so an earlier sync that named no revision (a
`kubectl patch` of `operation`) and started in the same second as our request would pass for ours.

Budgets come from the environments file: `timeouts.argocd.refresh`, then `timeouts.sync` for the operation
(its closing refresh, `timeouts.argocd.settle`, within it). Retries: none here; a transient fault of the
cluster's API is the engine's to retry, as a new attempt of the sync step.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from bot.adapters.kube import JSON, MERGE_PATCH, ClusterClient, KubeNotFound
from bot.budgets import DEFAULT_TIMEOUTS
from bot.errors import PermanentError, first_failure

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "argoproj.io", "v1alpha1", "applications"
REFRESH_ANNOTATION = "argocd.argoproj.io/refresh"
FINAL_PHASES = frozenset({"Succeeded", "Failed", "Error"})


def parse_time(value: object) -> dt.datetime | None:
    """RFC3339 (`2026-01-02T03:04:05Z`, optional fraction/offset) -> aware datetime; None if absent/garbled."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


class AppNotFound(PermanentError):
    """The Argo CD Application named in the config does not exist in that cluster."""


@dataclass(frozen=True)
class SyncResult:
    app: str
    revision: str
    phase: str
    started_at: str
    finished_at: str
    health: str
    sync_status: str
    message: str = ""


def operation_running(app: JSON) -> bool:
    """True when the app has an operation in flight: a pending `operation` or a Running operationState."""
    state = (app.get("status") or {}).get("operationState") or {}
    return bool(app.get("operation")) or state.get("phase") == "Running"


def refresh_consumed(app: JSON, before: dt.datetime | None) -> bool:
    """The controller reconciled after our refresh request: the annotation is gone, reconciledAt written.

    Only objects read after our patch are shown here (the watch lists first), and the controller drops the
    annotation in the same update that writes reconciledAt: its absence is the proof. reconciledAt may equal
    `before` (one-second resolution, the controller's clock); it is never compared with ours, so a controller
    whose clock is a second or two behind the bot's is not waited on until the refresh budget runs out.
    """
    annotations = (app.get("metadata") or {}).get("annotations") or {}
    if REFRESH_ANNOTATION in annotations:
        return False
    reconciled = parse_time((app.get("status") or {}).get("reconciledAt"))
    if reconciled is None:
        return False
    return before is None or reconciled >= before


def ours(state: JSON, previous: JSON, revision: str, username: str) -> bool:
    """This operationState is the operation we requested, not the one shown before it.

    `previous` is the operationState read just before our request (Argo CD keeps showing it until the
    controller starts ours); a state equal to it is never ours, however its timestamps compare to our clock.
    """
    if not state or state == previous:
        return False
    operation = state.get("operation") or {}
    asked = (operation.get("sync") or {}).get("revision")
    who = (operation.get("initiatedBy") or {}).get("username")
    return asked == revision and who == username


class ArgoCD:
    """The Argo CD Applications of one env, in that env's cluster."""

    def __init__(
        self,
        client: ClusterClient,
        namespace: str,
        *,
        env_name: str = "",
        refresh_limit: float = DEFAULT_TIMEOUTS.argocd.refresh,
        sync_limit: float = DEFAULT_TIMEOUTS.sync,
        post_sync_limit: float = DEFAULT_TIMEOUTS.argocd.settle,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.env_name = env_name or client.context
        self.refresh_limit = refresh_limit
        self.sync_limit = sync_limit
        self.post_sync_limit = post_sync_limit  # waiting for the controller's refresh after a finished sync

    async def get(self, app: str) -> JSON:
        try:
            return await self.client.call(
                f"Argo CD application {app}",
                self.client.custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                app,
            )
        except KubeNotFound:
            raise AppNotFound(
                f"Argo CD application {self.namespace}/{app} does not exist in {self.env_name}",
                hint="Check argocd.applications in the environments file.",
            ) from None

    async def _patch(self, app: str, body: JSON) -> JSON:
        # merge-patch explicitly: the client's default for a dict body is json-patch, which the API server rejects
        return await self.client.call(
            f"patch Argo CD application {app}",
            self.client.custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            app,
            body,
            _content_type=MERGE_PATCH,
        )

    def _watch(self, app: str) -> contextlib.aclosing[AsyncGenerator[tuple[str, JSON]]]:
        return contextlib.aclosing(
            self.client.watch(
                f"Argo CD application {app}",
                self.client.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                field_selector=f"metadata.name={app}",
            )
        )

    async def refresh(self, app: str) -> JSON:
        """Hard refresh and wait (watching) until the controller has consumed it; returns the app."""
        current = await self.get(app)
        before = parse_time((current.get("status") or {}).get("reconciledAt"))
        await self._patch(app, {"metadata": {"annotations": {REFRESH_ANNOTATION: "hard"}}})
        try:
            async with asyncio.timeout(self.refresh_limit), self._watch(app) as events:
                async for kind, obj in events:
                    if kind == "DELETED":
                        raise PermanentError(f"Argo CD application {app} was deleted during refresh")
                    if refresh_consumed(obj, before):
                        return dict(obj)
        except TimeoutError:
            raise PermanentError(
                f"Argo CD in {self.env_name} did not consume the refresh of {app} within {self.refresh_limit:.0f}s",
                hint="Check the application controller (argocd-application-controller) in that cluster.",
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover - the watch never ends by itself

    async def ensure_idle(self, app: str) -> JSON:
        obj = await self.get(app)
        if operation_running(obj):
            state = (obj.get("status") or {}).get("operationState") or {}
            who = (((state.get("operation") or obj.get("operation") or {}).get("initiatedBy")) or {}).get(
                "username"
            )
            raise PermanentError(
                f"Argo CD application {app} in {self.env_name} is already running an operation"
                + (f" started {state['startedAt']}" if state.get("startedAt") else "")
                + (f" by {who}" if who else ""),
                hint="Wait for it to finish (or terminate it in Argo CD), then deploy again; "
                "a sync requested now would be silently dropped.",
            )
        return obj

    async def sync(self, app: str, revision: str, *, username: str, refresh: bool = True) -> SyncResult:
        """Refresh, then sync `app` to `revision` and wait until that operation finished on that revision."""
        if refresh:
            await self.refresh(app)
        idle = await self.ensure_idle(app)
        reconciled_before = parse_time((idle.get("status") or {}).get("reconciledAt"))
        previous: JSON = (idle.get("status") or {}).get("operationState") or {}
        await self._patch(
            app,
            {"operation": {"initiatedBy": {"username": username}, "sync": {"revision": revision}}},
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.sync_limit
        finished: JSON | None = None
        try:
            async with asyncio.timeout_at(deadline) as limit, self._watch(app) as events:
                async for kind, obj in events:
                    if kind == "DELETED":
                        raise PermanentError(f"Argo CD application {app} was deleted during the sync")
                    state = (obj.get("status") or {}).get("operationState") or {}
                    if (
                        not ours(state, previous, revision, username)
                        or state.get("phase") not in FINAL_PHASES
                    ):
                        continue
                    self._check_outcome(app, revision, state)
                    if finished is None:
                        limit.reschedule(min(deadline, loop.time() + self.post_sync_limit))
                    finished = obj
                    # the controller refreshes once more after the operation: wait for it to report
                    # sync/health of the new revision
                    if _post_sync_refreshed(obj, state, reconciled_before):
                        break
        except TimeoutError:
            if finished is None:
                raise PermanentError(
                    f"the sync of {app} in {self.env_name} to {revision[:7]} did not finish within "
                    f"{self.sync_limit:.0f}s",
                    hint="Look at the application in Argo CD; if no operation started, another one may have "
                    "been running and Argo CD dropped ours.",
                ) from None
        if finished is None:  # pragma: no cover - the watch never ends by itself
            raise PermanentError(f"the watch of {app} in {self.env_name} ended before the sync finished")
        return _result(app, finished)

    def _check_outcome(self, app: str, revision: str, state: JSON) -> None:
        phase = state.get("phase")
        if phase != "Succeeded":
            raise PermanentError(
                f"Argo CD sync of {app} in {self.env_name} {str(phase).lower()}: {state.get('message') or 'no message'}",
                hint="Read the message above; fix the GitOps overlay or the cluster, then deploy again.",
            )
        synced = ((state.get("syncResult") or {}).get("revision")) or ""
        if synced != revision:
            raise PermanentError(
                f"Argo CD synced {app} in {self.env_name} to {synced[:7] or 'an unknown revision'}, "
                f"not the pushed {revision[:7]}",
                hint="Someone pushed or synced in between; run the deploy again.",
            )

    async def sync_all(self, apps: Sequence[str], revision: str, *, username: str) -> list[SyncResult]:
        """Sync several applications concurrently; the first failure cancels the rest and is raised."""
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(
                        self.sync(a, revision, username=username), name=f"argocd-sync-{self.env_name}-{a}"
                    )
                    for a in apps
                ]
        except BaseExceptionGroup as eg:
            raise first_failure(eg) from None
        return [t.result() for t in tasks]


def _post_sync_refreshed(obj: JSON, state: JSON, reconciled_before: dt.datetime | None) -> bool:
    """The controller compared the app again after the operation: reconciledAt >= finishedAt, and a NEW
    reconcile (the write that finishes the operation leaves the old reconciledAt, which can be >= finishedAt
    at one-second resolution)."""
    finished = parse_time(state.get("finishedAt"))
    reconciled = parse_time((obj.get("status") or {}).get("reconciledAt"))
    if finished is None or reconciled is None or reconciled < finished:
        return False
    return reconciled_before is None or reconciled > reconciled_before


def _result(app: str, obj: JSON) -> SyncResult:
    status = obj.get("status") or {}
    state = status.get("operationState") or {}
    return SyncResult(
        app=app,
        revision=str((state.get("syncResult") or {}).get("revision") or ""),
        phase=str(state.get("phase") or ""),
        started_at=str(state.get("startedAt") or ""),
        finished_at=str(state.get("finishedAt") or ""),
        health=str((status.get("health") or {}).get("status") or "Unknown"),
        sync_status=str((status.get("sync") or {}).get("status") or "Unknown"),
        message=str(state.get("message") or ""),
    )
