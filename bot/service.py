"""The deploy service: turns requests into pipeline runs, and owns the ledger record, leases and approvals.

Flow of a deploy (DESIGN.md §4): resolve → preflight form the plan (alone they are the dry run). An env
that needs approval stops there: the plan's binding (commit + image digests) is stored with the approval
request, and the rest runs only after a second person approves — with a fresh plan whose binding must be
the same. Then: images → migrate → gitops → sync → rollout → verify, under a lease per env.

One GitOps commit per request: `deploy staging,poc <commit>` bumps both envs' overlays in a single
`deploy(staging, poc): funnelcake @ <short>` commit, as the runbook does, then syncs each env's own Argo CD.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.adapters.migrations import check_force
from bot.drift import DriftReport, build_report
from bot.errors import PermanentError
from bot.ledger.models import (
    ApprovalExpired,
    DeployKind,
    DeployRecord,
    DeployState,
    Lease,
    LockHeld,
    ManualLock,
    StepState,
    who,
)
from bot.logs import deploy_context
from bot.models import Plan
from bot.pipeline.context import DeployContext, Deps
from bot.pipeline.engine import (
    EventKind,
    Pipeline,
    PipelineResult,
    Reporter,
    Step,
    StepEvent,
    StepOutcome,
)
from bot.pipeline.steps.force import ForceMigrate
from bot.pipeline.steps.gitops import GitOps
from bot.pipeline.steps.images import Images
from bot.pipeline.steps.migrate import Migrate
from bot.pipeline.steps.preflight import Preflight
from bot.pipeline.steps.resolve import Resolve
from bot.pipeline.steps.rollout import Rollout
from bot.pipeline.steps.sync import Sync
from bot.pipeline.steps.verify import Verify
from bot.settings import Environment, FunnelcakeConfig, Service

log = logging.getLogger(__name__)

BOT_USER = "funnelcake-bot"
SUMMARY_STEP = "deploy"  # the event that closes a run: its data is the summary a reporter shows
# The step names of each kind of run, for reporters that show the list up front (the CLI).
PLAN_STEPS = ("resolve", "preflight")
EXECUTE_STEPS = ("images", "migrate", "gitops", "sync", "rollout", "verify")
MIGRATE_STEPS = ("images", "migrate")

ReporterFactory = Callable[[DeployRecord], Sequence[Reporter]]


@dataclass
class Started:
    record: DeployRecord
    task: asyncio.Task[DeployRecord]


class LedgerReporter:
    """Writes each step's start and end into the audit trail."""

    def __init__(self, service: DeployService, deploy_id: str) -> None:
        self.service = service
        self.deploy_id = deploy_id

    async def emit(self, event: StepEvent) -> None:
        if event.step == SUMMARY_STEP:
            return  # the deploy record itself holds the outcome
        ledger = self.service.deps.ledger
        if event.kind is EventKind.STARTED:
            await ledger.record_step(self.deploy_id, event.step, state=StepState.RUNNING)
        elif event.kind in (EventKind.DONE, EventKind.SKIPPED, EventKind.FAILED, EventKind.ERRORED):
            state = {
                EventKind.DONE: StepState.OK,
                EventKind.SKIPPED: StepState.SKIPPED,
                EventKind.FAILED: StepState.FAILED,
                EventKind.ERRORED: StepState.ERRORED,
            }[event.kind]
            detail = {"message": event.message, "elapsed": round(event.elapsed, 3), "attempts": event.attempt}
            detail.update({k: v for k, v in event.data.items() if _jsonable(v)})
            await ledger.finish_step(self.deploy_id, event.step, state=state, detail=detail)


def _jsonable(value: object) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict, tuple))


class DeployService:
    def __init__(
        self,
        deps: Deps,
        *,
        reporters: ReporterFactory | None = None,
        instance_id: str | None = None,
        lease_ttl: float = 60.0,
        heartbeat_every: float = 15.0,
    ) -> None:
        self.deps = deps
        self.reporters = reporters or (lambda record: ())
        self.instance_id = instance_id or f"bot-{secrets.token_hex(4)}"
        self.lease_ttl = lease_ttl
        self.heartbeat_every = heartbeat_every
        self._tasks: dict[str, asyncio.Task[DeployRecord]] = {}
        self._heartbeats: dict[str, asyncio.Task[None]] = {}
        self._waiting: set[str] = set()  # orphaned deploys already told they wait for a manual unlock

    @property
    def config(self) -> FunnelcakeConfig:
        return self.deps.config

    # ---- public operations ------------------------------------------------------------------

    async def plan(
        self, env_names: Sequence[str], ref: str, requester: str
    ) -> tuple[Plan | None, PipelineResult]:
        """The dry run: resolve + preflight, touching nothing and recording nothing."""
        ctx = self._context("plan-" + secrets.token_hex(3), DeployKind.DEPLOY, env_names, ref, requester)
        result = await Pipeline(ctx.deploy_id, [Resolve(), Preflight()], []).run(ctx)
        return ctx.plan, result

    async def start(
        self,
        kind: DeployKind,
        env_names: Sequence[str],
        ref: str,
        requester: str,
        *,
        channel: str | None = None,
        thread_ts: str | None = None,
        rebuild: bool = False,
    ) -> Started:
        """Record the deploy and run it in a named background task; returns at once.

        `rebuild` builds every image from source for linux/amd64 even where a registry has the tag: the
        fix for an image whose manifest says amd64 but whose binaries are not (`exec format error`).
        """
        envs = [self.config.env(n) for n in env_names]
        record = await self.deps.ledger.create_deploy(
            kind=kind,
            envs=[e.name for e in envs],
            ref=ref,
            requester=requester,
            state=DeployState.RUNNING,
            channel=channel,
            thread_ts=thread_ts,
            owner=self.instance_id,
        )
        task = self._spawn(record.id, self._run_new(record, rebuild=rebuild))
        return Started(record, task)

    async def decide(self, deploy_id: str, user: str, *, approve: bool) -> DeployRecord:
        """Record an approval decision (the ledger makes the first one win); approve → the deploy continues."""
        record = await self.deps.ledger.get_deploy(deploy_id)
        if approve and user == record.requester:
            raise PermanentError(
                "You cannot approve your own deploy.", hint="Ask another approver to click Approve."
            )
        plan = Plan.from_json(record.plan) if record.plan else None
        binding = plan.binding() if plan else ""
        try:
            await self.deps.ledger.decide(
                deploy_id, user=user, decision="approve" if approve else "deny", binding=binding
            )
        except ApprovalExpired:
            await self._announce_expired(deploy_id)
            raise
        record = await self.deps.ledger.get_deploy(deploy_id)
        if approve:
            self._spawn(deploy_id, self._run_approved(record))
        else:
            message = f"denied by {who(user)}"
            await self._emit_for(record, "approval", EventKind.FAILED, message)
            summary = {**_summary(record, None, None), "failed_step": "approval"}
            await self._emit_for(record, SUMMARY_STEP, EventKind.FAILED, message, **summary)
        return record

    async def cancel(self, deploy_id: str) -> bool:
        task = self._tasks.get(deploy_id)
        if task is None or task.done():
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return True

    async def wait(self, deploy_id: str) -> DeployRecord:
        task = self._tasks.get(deploy_id)
        if task is not None:
            # asyncio.wait neither raises the deploy's outcome nor swallows the waiter's own cancellation
            await asyncio.wait({task})
        return await self.deps.ledger.get_deploy(deploy_id)

    async def status(self) -> DriftReport:
        return await build_report(self.deps)

    async def history(self, env_name: str | None = None, limit: int = 10) -> list[DeployRecord]:
        return await self.deps.ledger.history(env_name, limit)

    async def lock(self, env_name: str, user: str, reason: str) -> ManualLock:
        self.config.env(env_name)
        return await self.deps.ledger.lock(env_name, user, reason)

    async def unlock(self, env_name: str, user: str) -> ManualLock | None:
        self.config.env(env_name)
        return await self.deps.ledger.unlock(env_name, user)

    async def start_rollback(
        self, env_name: str, requester: str, *, channel: str | None = None, thread_ts: str | None = None
    ) -> Started:
        """Deploy the env's previous tag through the same pipeline; its images exist, so nothing is built."""
        target = await self.rollback_target(env_name)
        return await self.start(
            DeployKind.ROLLBACK, [env_name], target, requester, channel=channel, thread_ts=thread_ts
        )

    async def start_force(
        self, env_name: str, version: int, requester: str, *, channel: str | None = None
    ) -> Started:
        """Guarded recovery from a dirty migration (F7): force the version the last failed run reported, then up."""
        reported = await self.reported_dirty(env_name)
        check_force(env_name, version, reported[0] if reported else None)
        record = await self.deps.ledger.create_deploy(
            kind=DeployKind.FORCE_MIGRATE,
            envs=[env_name],
            ref=str(version),
            requester=requester,
            state=DeployState.RUNNING,
            channel=channel,
            owner=self.instance_id,
        )
        return Started(record, self._spawn(record.id, self._run_force(record, version, reported)))

    async def reported_dirty(self, env_name: str) -> tuple[int, str] | None:
        """The dirty version the newest migration run in `env` reported, and the commit whose migrate image
        ran it (recovery must use that image: an older one does not know the version), from the audit trail."""
        for record in await self.deps.ledger.history(env_name, 20):
            for step in reversed(await self.deps.ledger.steps(record.id)):
                if step.step not in ("migrate", "force-migrate") or not step.detail:
                    continue
                if step.detail.get("env", env_name) != env_name:
                    continue
                if step.state is StepState.FAILED and step.detail.get("dirty_version") is not None:
                    return int(step.detail["dirty_version"]), record.short or ""
                if step.state in (StepState.OK, StepState.FAILED):
                    return None  # the newest run either cleaned up or failed some other way
        return None

    async def _run_force(
        self, record: DeployRecord, version: int, reported: tuple[int, str] | None
    ) -> DeployRecord:
        ctx = self._context(record.id, record.kind, record.envs, record.ref, record.requester)

        async def work(leases: list[Lease]) -> DeployRecord:
            leases += await self._acquire(ctx.envs, record.id)
            dirty, image_tag = reported if reported else (None, None)
            result = await self._pipeline(record, [ForceMigrate(version, dirty, image_tag)]).run(ctx)
            return await self._finish(record, ctx, result)

        return await self._guarded(record, work)

    # ---- crash recovery ------------------------------------------------------------------------

    async def recover(self) -> list[str]:
        """Take over deploys whose bot died: their lease lapsed (or they never got one) while still running.

        A deploy that had not pushed to git is marked interrupted (nothing changed, deploy again); one that
        had pushed is resumed from sync, whose refresh + sync to the GitOps head is safe to repeat, then
        rollout and verify. Git itself is never half-pushed: a push is atomic on the remote.
        """
        for expired in await self.deps.ledger.expire_approvals():
            await self._announce_expired(expired)
        now = datetime.now(UTC)
        taken: list[str] = []
        for record in await self.deps.ledger.in_flight():
            if record.state is not DeployState.RUNNING or record.id in self._tasks:
                continue
            leases = [await self.deps.ledger.get_lease(env) for env in record.envs]
            if any(lease and lease.deploy_id == record.id and lease.expires_at > now for lease in leases):
                continue  # its bot is alive and heart-beating
            if record.owner == self.instance_id:
                continue  # ours but not running here: only after a failed spawn; leave it to the lease
            if now - record.updated_at < timedelta(seconds=self.lease_ttl):
                continue  # too fresh: a live bot may not have taken its lease yet
            taken.append(record.id)
            self._spawn(record.id, self._resume(record))
        return taken

    async def _announce_expired(self, deploy_id: str) -> None:
        record = await self.deps.ledger.get_deploy(deploy_id)
        seconds = self.config.timeouts.approval
        within = f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
        message = f"approval expired: nobody approved within {within}; deploy again to ask anew"
        await self._emit_for(record, "approval", EventKind.FAILED, message)
        summary = {**_summary(record, None, None), "failed_step": "approval"}
        await self._emit_for(record, SUMMARY_STEP, EventKind.FAILED, message, **summary)

    async def _resume(self, record: DeployRecord) -> DeployRecord:
        ctx = self._context(record.id, record.kind, record.envs, record.short or record.ref, record.requester)
        previous_owner = record.owner or "another bot"

        async def work(leases: list[Lease]) -> DeployRecord:
            nonlocal record
            try:
                leases += await self._acquire(ctx.envs, record.id)
            except LockHeld as held:
                # Another bot is taking it over (stand down, not a failure), or someone locked the env by hand
                # while its bot was dead: then say once why the deploy waits.
                manual = [lock for lock in await self.deps.ledger.locks() if lock.env in record.envs]
                if manual and record.id not in self._waiting:
                    self._waiting.add(record.id)
                    message = f"waiting to resume: {held.message} The deploy resumes once it is unlocked."
                    await self._emit_for(record, "recovery", EventKind.PROGRESS, message)
                return record
            # Two bots may find the same orphan: the lease admits one at a time, but the second may get it
            # after the first finished. Whoever finds it no longer RUNNING under the dead owner stands down.
            current = await self.deps.ledger.get_deploy(record.id)
            if current.state is not DeployState.RUNNING or current.owner != record.owner:
                log.info("deploy %s was already taken over by %s", record.id, current.owner)
                return current
            record = await self.deps.ledger.update_deploy(
                record.id, expect_state=DeployState.RUNNING, owner=self.instance_id
            )
            done = {s.step for s in await self.deps.ledger.steps(record.id) if s.state is StepState.OK}
            pushed = "gitops" in done or await self._overlays_at(record)
            where = record.last_step or "start"
            if not record.kind.changes_tags or not pushed or record.plan is None:
                message = (
                    f"interrupted after {where}: {previous_owner} stopped before anything reached git; "
                    "nothing was pushed — deploy again"
                )
                await self._emit_for(record, "recovery", EventKind.FAILED, message)
                record = await self.deps.ledger.update_deploy(
                    record.id, state=DeployState.INTERRUPTED, message=message
                )
                await self._emit_for(
                    record, "deploy", EventKind.FAILED, message, **_summary(record, ctx, None)
                )
                return record
            ctx.plan = Plan.from_json(record.plan)
            ctx.commit = ctx.plan.commit
            await self._emit_for(
                record,
                "recovery",
                EventKind.PROGRESS,
                f"{self.instance_id} took over from {previous_owner} (stopped after {where}); "
                "the push is on the remote, resuming at sync",
            )
            result = await self._pipeline(record, [Sync(), Rollout(), Verify()]).run(ctx)
            return await self._finish(record, ctx, result)

        return await self._guarded(record, work)

    async def _overlays_at(self, record: DeployRecord) -> bool:
        """Did this deploy's push land although its gitops step was never recorded as done?"""
        tags = await self.deps.gitops.read_tags(self.config)
        return bool(record.short) and all(
            set(tags.get(env, {}).values()) == {record.short} for env in record.envs
        )

    async def rollback_target(self, env_name: str) -> str:
        """Where a rollback goes: the last tag this bot deployed successfully, if the env has moved off it
        since (a failed deploy, or a hand edit of the overlay); else the tag before the newest deploy."""
        current = (await self.deps.gitops.read_tags(self.config)).get(env_name, {}).get(Service.API)
        last = await self.deps.ledger.last_succeeded(env_name)
        if last is not None and last.tags.get(env_name) and last.tags[env_name] != current:
            return last.tags[env_name]
        for record in await self.deps.ledger.history(env_name, 50):
            if not record.kind.changes_tags:
                continue
            previous = record.previous_tags.get(env_name)
            if previous and previous != current:
                return previous
        # Nothing in the ledger (the env was only ever changed by hand): the overlay's own git history.
        history = await self.deps.gitops.tag_history(self.config.env(env_name), Service.API)
        earlier = [t for t in history if t != current]
        if earlier:
            return earlier[0]
        raise PermanentError(
            f"no earlier deploy of {env_name} is recorded, so there is nothing to roll back to",
            hint=f"Deploy a known-good commit instead: `/funnelcake deploy {env_name} <commit>`.",
        )

    async def shutdown(self) -> None:
        tasks = [t for t in self._tasks.values() if not t.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ---- the runs -----------------------------------------------------------------------------

    def _spawn(self, deploy_id: str, coro: Coroutine[Any, Any, DeployRecord]) -> asyncio.Task[DeployRecord]:
        # The task copies the context at creation: every log line of this deploy carries its id.
        with deploy_context(deploy_id):
            task = asyncio.create_task(coro, name=f"deploy-{deploy_id}")
        self._tasks[deploy_id] = task
        task.add_done_callback(
            lambda t: self._tasks.pop(deploy_id, None) if self._tasks.get(deploy_id) is t else None
        )
        return task

    def _context(
        self, deploy_id: str, kind: DeployKind, env_names: Sequence[str], ref: str, requester: str
    ) -> DeployContext:
        return DeployContext(
            self.deps,
            deploy_id,
            kind,
            [self.config.env(n) for n in env_names],
            ref,
            requester,
            force_migrations=kind is DeployKind.MIGRATE,
        )

    def _needs_approval(self, record: DeployRecord) -> bool:
        if record.kind is DeployKind.ROLLBACK:
            return False  # back to a tag that already ran there; speed matters more than a second click
        return any(self.config.env(e).approval_required for e in record.envs)

    def _pipeline(
        self, record: DeployRecord, steps: Sequence[Step[DeployContext]]
    ) -> Pipeline[DeployContext]:
        reporters: list[Reporter] = [LedgerReporter(self, record.id), *self.reporters(record)]
        return Pipeline(record.id, steps, reporters)

    async def _emit_for(
        self, record: DeployRecord, step: str, kind: EventKind, message: str, **data: object
    ) -> None:
        await self._pipeline(record, [])._emit(StepEvent(record.id, step, kind, message, data))

    async def _run_new(self, record: DeployRecord, *, rebuild: bool = False) -> DeployRecord:
        ctx = self._context(record.id, record.kind, record.envs, record.ref, record.requester)
        ctx.rebuild = rebuild
        approval = self._needs_approval(record)

        async def work(leases: list[Lease]) -> DeployRecord:
            nonlocal record
            if not approval:
                leases += await self._acquire(ctx.envs, record.id)
            planned = await self._pipeline(record, [Resolve(), Preflight()]).run(ctx)
            record = await self._save_plan(record, ctx)
            if not planned.ok:
                return await self._finish(record, ctx, planned)
            if approval:
                return await self._request_approval(record, ctx)
            executed = await self._pipeline(record, self._execute_steps(record.kind)).run(ctx)
            return await self._finish(record, ctx, executed)

        return await self._guarded(record, work)

    async def _run_approved(self, record: DeployRecord) -> DeployRecord:
        ctx = self._context(record.id, record.kind, record.envs, record.ref, record.requester)
        ctx.rebuild = bool(record.plan and record.plan.get("rebuild"))

        async def work(leases: list[Lease]) -> DeployRecord:
            leases += await self._acquire(ctx.envs, record.id)
            await self._emit_for(
                record, "approval", EventKind.DONE, f"approved by {who(record.approver or '?')}"
            )
            # Re-plan: the approval holds only if the commit and every digest are still what was approved.
            replanned = await Pipeline(record.id, [Resolve(), Preflight()], []).run(ctx)
            if not replanned.ok or ctx.plan is None:
                return await self._finish(record, ctx, replanned)
            await self.deps.ledger.verify_approval(record.id, binding=ctx.plan.binding())
            executed = await self._pipeline(record, self._execute_steps(record.kind)).run(ctx)
            return await self._finish(record, ctx, executed)

        return await self._guarded(record, work)

    async def _guarded(
        self, record: DeployRecord, work: Callable[[list[Lease]], Awaitable[DeployRecord]]
    ) -> DeployRecord:
        """Run one deploy's work holding its leases; a refusal before the pipeline (env locked or
        leased, approval voided) ends the deploy with that message; leases are always released."""
        leases: list[Lease] = []
        try:
            return await work(leases)
        except PermanentError as e:
            step = "lock" if isinstance(e, LockHeld) else "approval"
            record = await self.deps.ledger.update_deploy(
                record.id, state=DeployState.FAILED, message=e.message
            )
            summary = {**_summary(record, None, None), "failed_step": step, "hint": e.hint}
            await self._emit_for(record, "deploy", EventKind.FAILED, e.message, **summary)
            return record
        except asyncio.CancelledError:
            await asyncio.shield(self._cancelled(record))
            raise
        finally:
            await asyncio.shield(self._release(leases))

    def _execute_steps(self, kind: DeployKind) -> list[Step[DeployContext]]:
        steps: list[Step[DeployContext]] = [Images(), Migrate(), GitOps(), Sync(), Rollout(), Verify()]
        names = MIGRATE_STEPS if kind is DeployKind.MIGRATE else EXECUTE_STEPS
        return [s for s in steps if s.name in names]

    async def _request_approval(self, record: DeployRecord, ctx: DeployContext) -> DeployRecord:
        plan = ctx.require_plan()
        expires = datetime.now(UTC) + timedelta(seconds=self.config.timeouts.approval)
        await self.deps.ledger.request_approval(
            record.id, binding=plan.binding(), requester=record.requester, expires_at=expires
        )
        record = await self.deps.ledger.get_deploy(record.id)
        await self._emit_for(
            record,
            "approval",
            EventKind.STARTED,
            "waiting for approval",
            plan=plan.to_json(),
            expires_at=expires.isoformat(),
        )
        return record

    async def _save_plan(self, record: DeployRecord, ctx: DeployContext) -> DeployRecord:
        if ctx.plan is None:
            return record
        previous = {e: ep.previous.get("api", "") for e, ep in ctx.plan.env_plans.items()}
        short = ctx.plan.commit.short
        tags = {e: short for e in record.envs} if record.kind.changes_tags else {}
        return await self.deps.ledger.update_deploy(
            record.id,
            plan=ctx.plan.to_json(),
            sha=ctx.plan.commit.sha,
            short=short,
            previous_tags={e: t for e, t in previous.items() if t},
            tags=tags,
        )

    async def _finish(self, record: DeployRecord, ctx: DeployContext, result: PipelineResult) -> DeployRecord:
        failed = result.failed
        if failed is None:
            record = await self.deps.ledger.update_deploy(
                record.id, state=DeployState.SUCCEEDED, message="deployed"
            )
            await self._clear_failure_lock(record)
        else:
            message = f"{failed.step}: {failed.message}"
            record = await self.deps.ledger.update_deploy(
                record.id, state=DeployState.FAILED, message=message
            )
            changed_git = any(r.step == "gitops" and r.outcome is StepOutcome.OK for r in result.results)
            for env in record.envs:
                if changed_git and self.config.env(env).approval_required:
                    # A failed production deploy holds production until someone rolls back or unlocks.
                    reason = f"deploy {record.id} failed at {failed.step}; roll back or unlock"
                    await self.deps.ledger.lock(env, BOT_USER, reason)
        await self._emit_for(
            record,
            "deploy",
            EventKind.DONE if failed is None else EventKind.FAILED,
            record.message or "",
            **_summary(record, ctx, result),
        )
        return record

    async def _clear_failure_lock(self, record: DeployRecord) -> None:
        for lock in await self.deps.ledger.locks():
            if lock.env in record.envs and lock.user == BOT_USER:
                await self.deps.ledger.unlock(lock.env, BOT_USER)

    async def _cancelled(self, record: DeployRecord) -> None:
        with contextlib.suppress(Exception):
            await self.deps.ledger.update_deploy(record.id, state=DeployState.CANCELLED, message="cancelled")

    # ---- leases -------------------------------------------------------------------------------

    async def _acquire(self, envs: Sequence[Environment], deploy_id: str) -> list[Lease]:
        leases: list[Lease] = []
        record = await self.deps.ledger.get_deploy(deploy_id)
        try:
            for env in sorted(
                envs, key=lambda e: e.name
            ):  # a fixed order: two multi-env deploys never deadlock
                await self._refuse_if_locked(env, record)
                leases.append(
                    await self.deps.ledger.acquire_lease(
                        env.name,
                        holder=self.instance_id,
                        deploy_id=deploy_id,
                        ttl=self.lease_ttl,
                        ignore_lock_by=BOT_USER if record.kind is DeployKind.ROLLBACK else None,
                    )
                )
        except BaseException:
            await self._release(leases)
            raise
        self._spawn_heartbeat(deploy_id, leases)
        return leases

    async def _refuse_if_locked(self, env: Environment, record: DeployRecord) -> None:
        for lock in await self.deps.ledger.locks():
            if lock.env != env.name:
                continue
            if record.kind is DeployKind.ROLLBACK and lock.user == BOT_USER:
                continue  # a rollback is the way out of a failed-deploy lock
            raise LockHeld.for_lock(lock, datetime.now(UTC))

    def _spawn_heartbeat(self, deploy_id: str, leases: list[Lease]) -> None:
        async def beat() -> None:
            while True:
                await asyncio.sleep(self.heartbeat_every)
                for lease in leases:
                    if not await self.deps.ledger.heartbeat(lease.env, self.instance_id, self.lease_ttl):
                        log.error("lost the lease on %s for %s", lease.env, deploy_id)
                        deploy = self._tasks.get(deploy_id)
                        if deploy is not None:
                            deploy.cancel()
                        return

        task = asyncio.create_task(beat(), name=f"lease-heartbeat-{deploy_id}")
        self._heartbeats[deploy_id] = task

    async def _release(self, leases: list[Lease]) -> None:
        if not leases:
            return
        beat = self._heartbeats.pop(leases[0].deploy_id, None)
        if beat is not None:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        for lease in leases:
            with contextlib.suppress(Exception):
                await self.deps.ledger.release_lease(lease.env, self.instance_id)


def _summary(
    record: DeployRecord, ctx: DeployContext | None, result: PipelineResult | None
) -> dict[str, Any]:
    """The final reply's facts: duration, images with digests, the Argo CD revision, where it stopped."""
    failed = result.failed if result else None
    revision = next((r.revision for rs in ctx.synced.values() for r in rs), None) if ctx else None
    return {
        "state": record.state.value,
        "deploy_kind": record.kind.value,
        "envs": list(record.envs),
        "short": record.short,
        "seconds": round((datetime.now(UTC) - record.created_at).total_seconds(), 1),
        "images": {f"{env}/{image}": s.digest for (env, image), s in sorted(ctx.verified.items())}
        if ctx
        else {},
        "revision": revision,
        "failed_step": failed.step if failed else None,
        "hint": failed.hint if failed else None,
        "failure": dict(failed.data) if failed else {},
        "rollback_to": {e: ep.previous.get(Service.API.value) for e, ep in ctx.plan.env_plans.items()}
        if ctx and ctx.plan
        else {},
    }
