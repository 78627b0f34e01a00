"""The deploy service: turns requests into pipeline runs, and owns the ledger record, leases and approvals.

Flow of a deploy: resolve → preflight form the plan (alone they are the dry run). An env
that needs approval stops there: the plan's binding (commit + image digests) is stored with the approval
request, and the rest runs only after a second person approves — with a fresh plan whose binding must be
the same. Then: images → migrate → gitops → sync → rollout → verify, under a lease per env.

One GitOps commit per request: `deploy staging,poc <commit>` bumps both envs' overlays in a single
`deploy(staging, poc): funnelcake @ <short>` commit, as the runbook does, then syncs each env's own Argo CD.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from bot import recovery
from bot.adapters.migrations import check_force
from bot.approvals import Approvals
from bot.errors import PermanentError
from bot.leases import LeaseKeeper
from bot.ledger.models import (
    ApprovalExpired,
    DeployRecord,
    DeployState,
    Fenced,
    LockHeld,
    UnknownDeploy,
    who,
)
from bot.ledger_reporter import LedgerReporter
from bot.models import DeployKind, Plan
from bot.outcomes import _log_started, deploy_summary
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Pipeline, PipelineResult, Step, StepOutcome
from bot.pipeline.steps.force import ForceMigrate
from bot.pipeline.steps.gitops import GitOps
from bot.pipeline.steps.images import Images
from bot.pipeline.steps.migrate import Migrate
from bot.pipeline.steps.preflight import Preflight
from bot.pipeline.steps.resolve import Resolve
from bot.pipeline.steps.rollout import Rollout
from bot.pipeline.steps.sync import Sync
from bot.pipeline.steps.verify import Verify
from bot.pipeline.vocab import (
    EXECUTE_STEPS,
    MIGRATE_STEPS,
    PLAN_STEPS,
    POST_PUSH_STEPS,
    SUMMARY_STEP,
    EventKind,
    StepName,
)
from bot.policy import locks
from bot.runs import Run, Stop
from bot.service_core import ReporterFactory

log = logging.getLogger(__name__)

# Split across sibling modules; these names are still imported from here.
__all__ = [
    "EXECUTE_STEPS",
    "MIGRATE_STEPS",
    "PLAN_STEPS",
    "POST_PUSH_STEPS",
    "DeployService",
    "LedgerReporter",
    "ReporterFactory",
    "Started",
]


@dataclass
class Started:
    record: DeployRecord
    task: asyncio.Task[DeployRecord]


class DeployService(Approvals):
    """Requests, runs and recovery hooks; the layers below it: Approvals (bot/approvals.py) → Stopping
    (bot/stopping.py) → Lookups (bot/lookups.py) → ServiceCore (bot/service_core.py)."""

    # ---- public operations ------------------------------------------------------------------

    async def plan(
        self,
        env_names: Sequence[str],
        ref: str,
        requester: str,
        *,
        allow_downgrade: bool = False,
        override_reason: str | None = None,
    ) -> tuple[Plan | None, PipelineResult]:
        """The dry run: resolve + preflight, touching nothing and recording nothing."""
        ctx = self._context("plan-" + secrets.token_hex(3), DeployKind.DEPLOY, env_names, ref, requester)
        ctx.allow_downgrade = allow_downgrade
        ctx.override_reason = override_reason
        result = await Pipeline(ctx.deploy_id, [Resolve(), Preflight()], [], budgets=self._budgets).run(ctx)
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
        origin: str | None = None,
        allow_downgrade: bool = False,
        override_reason: str | None = None,
    ) -> Started:
        """Record the deploy and run it in a named background task; returns at once.

        `rebuild` builds every image from source for linux/amd64 even where a registry has the tag: the
        fix for an image whose manifest says amd64 but whose binaries are not (`exec format error`).
        `allow_downgrade` is the requester's confirmation that an env may move back (kept in the plan);
        `override_reason` takes it past a promotion gate (the caller checked the requester is an admin).
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
            origin=origin,
        )
        _log_started(record)
        task = self._spawn(
            record,
            self._run_new(
                record, rebuild=rebuild, allow_downgrade=allow_downgrade, override_reason=override_reason
            ),
        )
        return Started(record, task)

    async def admit(self, kind: DeployKind, env_names: Sequence[str], ref: str | None) -> None:
        """Refuse, before anything is recorded or leased, a request that cannot run now: an env held by a lock
        (the one lock rule) or by another deploy's live lease, or a ref the app repo does not know. The lease
        taken when the run starts still decides a race; this only keeps mistakes out of the audit trail."""
        ledger = self.deps.ledger
        for name in env_names:
            self.config.env(name)
        now = datetime.now(UTC)
        held = locks.blocking(await ledger.locks(), env_names, kind)
        if held:
            raise LockHeld.for_lock(held[0], now)
        for lease in await ledger.leases():
            if lease.env in env_names and lease.expires_at > now:
                try:
                    deploy: DeployRecord | None = await ledger.get_deploy(lease.deploy_id)
                except UnknownDeploy:
                    deploy = None
                raise LockHeld.for_lease(lease, deploy, now)
        if ref:
            await self.deps.app_repo.resolve(ref)

    async def decide(
        self, deploy_id: str, user: str, *, approve: bool, envs: Sequence[str] | None = None
    ) -> DeployRecord:
        """Record an approval decision (the ledger makes the first one win); approve → the deploy continues.

        `envs` are the envs needing approval that `user` approves for (the authority checked them); a
        multi-env request runs once every env that needs approval has one, a denial by any of them ends it."""
        record = await self.deps.ledger.get_deploy(deploy_id)
        if approve and user == record.requester:
            raise PermanentError(
                "You cannot approve your own deploy.", hint="Ask another approver to click Approve."
            )
        needing = [e for e in record.envs if self.config.env(e).approval_required]
        if approve and len(needing) > 1 and record.state is DeployState.AWAITING_APPROVAL:
            approved = await self.deps.ledger.approve_envs(
                deploy_id, [e for e in (envs or needing) if e in needing], user=user
            )
            waiting = [e for e in needing if e not in approved]
            if waiting:
                done = ", ".join(f"{e} by {who(u)}" for e, u in approved.items())
                await self.emit_for(
                    record,
                    StepName.APPROVAL,
                    EventKind.PROGRESS,
                    f"approved for {done}; still waiting for an approver of {', '.join(waiting)}",
                )
                return record
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
            self._spawn(record, self._run_approved(record))
        else:
            message = f"denied by {who(user)}"
            await self.emit_for(record, StepName.APPROVAL, EventKind.FAILED, message)
            summary = deploy_summary(record, None, None, failed_step=StepName.APPROVAL)
            await self.emit_for(record, SUMMARY_STEP, EventKind.FAILED, message, summary=summary)
        return record

    def task(self, deploy_id: str) -> asyncio.Task[DeployRecord] | None:
        """The task running the deploy in this process, if any (the CLI waits on it, Ctrl-C cancels it)."""
        return self._tasks.get(deploy_id)

    def running(self, deploy_id: str) -> bool:
        task = self._tasks.get(deploy_id)
        return task is not None and not task.done()

    async def wait(self, deploy_id: str) -> DeployRecord:
        task = self._tasks.get(deploy_id)
        if task is not None:
            # asyncio.wait neither raises the deploy's outcome nor swallows the waiter's own cancellation
            await asyncio.wait({task})
        return await self.deps.ledger.get_deploy(deploy_id)

    async def start_rollback(
        self,
        env_name: str,
        requester: str,
        *,
        channel: str | None = None,
        thread_ts: str | None = None,
        origin: str | None = None,
        allow_downgrade: bool = False,
    ) -> Started:
        """Deploy the env's previous tag through the same pipeline; its images exist, so nothing is built.
        Back across a migration boundary it needs `allow_downgrade`: those migrations stay applied."""
        target = await self.rollback_target(env_name)
        return await self.start(
            DeployKind.ROLLBACK,
            [env_name],
            target,
            requester,
            channel=channel,
            thread_ts=thread_ts,
            origin=origin,
            allow_downgrade=allow_downgrade,
        )

    async def start_force(
        self,
        env_name: str,
        version: int,
        requester: str,
        *,
        channel: str | None = None,
        origin: str | None = None,
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
            origin=origin,
        )
        _log_started(record)
        return Started(record, self._spawn(record, self._run_force(record, version, reported)))

    # ---- crash recovery and hand-over (bot/recovery.py decides; these are its hooks) ----------

    async def recover(self) -> list[str]:
        """Take over deploys no live bot runs: handed over on a graceful stop, or whose bot died or lost its
        lease (this bot's own included, after a restart with the same identity or a failed run)."""
        for expired in await self.deps.ledger.expire_approvals():
            await self._announce_expired(expired)
        for due in await self.deps.ledger.claim_reminders(self.reminder_lead):
            await self._remind(due)
        taken: list[str] = []
        for record in await recovery.orphans(self):
            taken.append(record.id)
            self._spawn(record, recovery.resume(self, record))
        return taken

    def note_waiting(self, deploy_id: str) -> bool:
        """True the first time an orphan is found waiting for a manual unlock (say it once)."""
        if deploy_id in self._waiting:
            return False
        self._waiting.add(deploy_id)
        return True

    def post_push_steps(self) -> list[Step[DeployContext]]:
        return [Sync(), Rollout(), Verify()]

    async def run_steps(self, run: Run, steps: Sequence[Step[DeployContext]]) -> DeployRecord:
        result = await self._pipeline(run, steps).run(run.ctx)
        return await self._finish(run, result)

    async def replan_and_run(self, run: Run) -> DeployRecord:
        """Plan again and run the rest; an approved deploy goes on only if the plan is what was approved."""
        replanned = await self._pipeline(run, [Resolve(), Preflight()]).run(run.ctx)
        if not replanned.ok or run.ctx.plan is None:
            return await self._finish(run, replanned)
        if self._needs_approval(run.record):
            await self.deps.ledger.verify_approval(run.record.id, binding=run.ctx.plan.binding())
        return await self.run_steps(run, self._execute_steps(run.record.kind))

    async def finish_with(self, run: Run, state: DeployState, message: str) -> DeployRecord:
        run.ending = True
        run.record = await self._write(run, state=state, message=message)
        summary = deploy_summary(run.record, None, None, failed_step=StepName.RECOVERY)
        await self.emit_for(run.record, SUMMARY_STEP, EventKind.FAILED, message, summary=summary)
        return run.record

    async def guarded(
        self, record: DeployRecord, work: Callable[[Run], Awaitable[DeployRecord]]
    ) -> DeployRecord:
        """Run one deploy's work as its owner. A refusal before the pipeline (env locked or leased, approval
        voided) ends the deploy with that message; a stop (cancel, hand-over, lost lease) ends it as
        `_stopped` says; leases are always released."""
        ctx = self._context(record.id, record.kind, record.envs, record.short or record.ref, record.requester)
        # a resumed or approved run keeps the confirmation its requester gave (recorded with the plan)
        ctx.allow_downgrade = bool(record.plan and record.plan.get("allow_downgrade"))
        ctx.override_reason = record.plan.get("override_reason") if record.plan else None
        ctx.approver = record.approver
        run = Run(record, ctx, task=self._tasks.get(record.id))
        self._runs[record.id] = run
        try:
            return await work(run)
        except Fenced as e:
            await self._lost(run, e.why)
            return run.record
        except PermanentError as e:
            step = StepName.LOCK if isinstance(e, LockHeld) else StepName.APPROVAL
            run.ending = True
            try:
                run.record = await self._write(run, state=DeployState.FAILED, message=e.message)
            except Fenced as lost:
                await self._lost(run, lost.why)
                return run.record
            summary = deploy_summary(run.record, None, None, failed_step=step, hint=e.hint)
            await self.emit_for(run.record, SUMMARY_STEP, EventKind.FAILED, e.message, summary=summary)
            return run.record
        except asyncio.CancelledError:
            stop = run.stop or (Stop("handover") if self._stopping else Stop("cancel"))
            await asyncio.shield(self._stopped(run, stop))
            task = asyncio.current_task()
            if run.stop is not None and stop.kind != "handover" and task is not None and task.uncancel() == 0:
                return run.record  # we stopped it ourselves: the run ends normally, with its record
            raise
        finally:
            if run.keeper is not None:
                await asyncio.shield(run.keeper.release())
            if self._runs.get(record.id) is run:
                self._runs.pop(record.id, None)
                self._ledger_reporters.pop(record.id, None)

    async def take_leases(self, run: Run) -> None:
        """Hold the run's envs under its fence; the one lock rule: only the bot's own failure lock lets a
        rollback through."""
        fence = run.record.fence
        if fence is None:
            raise Fenced(run.record.id, "it has no owner")
        deploy_id = run.record.id
        run.keeper = LeaseKeeper(
            self.deps.ledger,
            deploy_id,
            fence,
            ttl=self.lease_ttl,
            heartbeat_every=self.heartbeat_every,
            on_lost=lambda lost: self._stop(deploy_id, Stop("lost", why=lost.why)),
            on_cancel=lambda user: self._stop(deploy_id, Stop("cancel", by=user)),
        )
        kind = run.record.kind
        await run.keeper.acquire(run.record.envs, passes=lambda lock: locks.passes(lock, kind))
        run.ctx.guard = run.keeper.prove

    async def _own(self, record: DeployRecord) -> DeployRecord:
        """Become the deploy's owner at a new epoch: whoever wrote as its owner before is fenced out."""
        return await self.deps.ledger.claim_deploy(record.id, owner=self.instance_id, expect=record.fence)

    async def _run_new(
        self,
        record: DeployRecord,
        *,
        rebuild: bool = False,
        allow_downgrade: bool = False,
        override_reason: str | None = None,
    ) -> DeployRecord:
        record = await self._own(record)
        approval = self._needs_approval(record)

        async def work(run: Run) -> DeployRecord:
            run.ctx.rebuild = rebuild
            run.ctx.allow_downgrade = allow_downgrade
            run.ctx.override_reason = override_reason
            if not approval:
                await self.take_leases(run)
            planned = await self._pipeline(run, [Resolve(), Preflight()]).run(run.ctx)
            await self._save_plan(run)
            if not planned.ok:
                return await self._finish(run, planned)
            if approval:
                return await self._request_approval(run)
            return await self.run_steps(run, self._execute_steps(run.record.kind))

        return await self.guarded(record, work)

    async def _run_approved(self, record: DeployRecord) -> DeployRecord:
        record = await self._own(record)

        async def work(run: Run) -> DeployRecord:
            run.ctx.rebuild = bool(record.plan and record.plan.get("rebuild"))
            await self.take_leases(run)
            await self.emit_for(
                run.record,
                StepName.APPROVAL,
                EventKind.DONE,
                f"approved by {who(run.record.approver or '?')}",
            )
            # Re-plan: the approval holds only if the commit and every digest are still what was approved.
            replanned = await Pipeline(
                run.record.id, [Resolve(), Preflight()], [], budgets=self._budgets
            ).run(run.ctx)
            if not replanned.ok or run.ctx.plan is None:
                return await self._finish(run, replanned)
            await self.deps.ledger.verify_approval(run.record.id, binding=run.ctx.plan.binding())
            return await self.run_steps(run, self._execute_steps(run.record.kind))

        return await self.guarded(record, work)

    async def _run_force(
        self, record: DeployRecord, version: int, reported: tuple[int, str] | None
    ) -> DeployRecord:
        record = await self._own(record)

        async def work(run: Run) -> DeployRecord:
            await self.take_leases(run)
            dirty, image_tag = reported if reported else (None, None)
            return await self.run_steps(run, [ForceMigrate(version, dirty, image_tag)])

        return await self.guarded(record, work)

    def _execute_steps(self, kind: DeployKind) -> list[Step[DeployContext]]:
        steps: list[Step[DeployContext]] = [Images(), Migrate(), GitOps(), Sync(), Rollout(), Verify()]
        names = MIGRATE_STEPS if kind is DeployKind.MIGRATE else EXECUTE_STEPS
        return [s for s in steps if s.name in names]

    async def _save_plan(self, run: Run) -> None:
        ctx = run.ctx
        if ctx.plan is None:
            return
        previous = {e: ep.previous.get("api", "") for e, ep in ctx.plan.env_plans.items()}
        short = ctx.plan.commit.short
        tags = {e: short for e in run.record.envs} if run.record.kind.changes_tags else {}
        run.record = await self._write(
            run,
            plan=ctx.plan.to_json(),
            sha=ctx.plan.commit.sha,
            short=short,
            previous_tags={e: t for e, t in previous.items() if t},
            tags=tags,
        )

    async def _finish(self, run: Run, result: PipelineResult) -> DeployRecord:
        failed = result.failed
        if failed is not None and run.keeper is not None and run.keeper.lost is not None:
            raise Fenced(run.record.id, run.keeper.lost.why)  # the step stopped because the lease was lost
        run.ending = True
        if failed is None:
            run.record = await self._write(run, state=DeployState.SUCCEEDED, message="deployed")
            await self._clear_failure_lock(run.record)
        else:
            message = f"{failed.step}: {failed.message}"
            run.record = await self._write(run, state=DeployState.FAILED, message=message)
            changed_git = any(
                r.step == StepName.GITOPS and r.outcome is StepOutcome.OK for r in result.results
            )
            if changed_git:
                await self._lock_after_failure(run.record, failed.step)
        await self.emit_for(
            run.record,
            SUMMARY_STEP,
            EventKind.DONE if failed is None else EventKind.FAILED,
            run.record.message or "",
            summary=deploy_summary(run.record, run.ctx, result),
        )
        return run.record
