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
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from bot import recovery
from bot.adapters.endpoints import summary_line
from bot.adapters.migrations import check_force
from bot.drift import DriftReport, build_report
from bot.errors import BotError, PermanentError, TransientError
from bot.leases import LeaseKeeper
from bot.ledger.models import (
    ApprovalExpired,
    DeployRecord,
    DeployState,
    Fenced,
    LockHeld,
    ManualLock,
    StepState,
    UnknownDeploy,
    who,
)
from bot.logs import deploy_context
from bot.models import BOT_USER, DeployKind, Plan
from bot.pipeline.context import DeployContext, Deps
from bot.pipeline.engine import (
    SUMMARY_STEP,
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
from bot.pipeline.steps.resolve import Resolve, downgrade_problems
from bot.pipeline.steps.rollout import Rollout
from bot.pipeline.steps.sync import Sync
from bot.pipeline.steps.verify import Verify
from bot.policy import locks
from bot.runs import Run, RunTracker, Stop
from bot.settings import FunnelcakeConfig, Service

log = logging.getLogger(__name__)

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
    """Writes each step's start and end into the audit trail, as the run's current owner (fenced).

    When the ledger is unreachable the events are kept, in order, and written once it answers again (the
    next event, or the run's final write, replays them): no step row is lost to an outage. A write refused
    because another bot owns the deploy now drops them: the successor writes its own."""

    def __init__(self, service: DeployService, run: Run) -> None:
        self.service = service
        self.run = run
        self.pending: list[StepEvent] = []

    async def emit(self, event: StepEvent) -> None:
        if event.step == SUMMARY_STEP:
            return  # the deploy record itself holds the outcome
        self.pending.append(event)
        with contextlib.suppress(TransientError):
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending; TransientError leaves the rest pending, Fenced drops it."""
        while self.pending:
            try:
                await self._write(self.pending[0])
            except Fenced:
                self.pending.clear()
                return
            except TransientError:
                if len(self.pending) == 1 or len(self.pending) % 20 == 0:
                    log.warning("ledger unreachable: %d step event(s) kept for later", len(self.pending))
                raise
            self.pending.pop(0)

    async def _write(self, event: StepEvent) -> None:
        ledger = self.service.deps.ledger
        fence = self.run.record.fence
        if event.kind is EventKind.STARTED:
            await ledger.record_step(
                self.run.record.id, event.step, state=StepState.RUNNING, fence=fence, at=event.at
            )
        elif event.kind in _STEP_STATES:
            detail = {"message": event.message, "elapsed": round(event.elapsed, 3), "attempts": event.attempt}
            detail.update({k: v for k, v in event.data.items() if _jsonable(v)})
            await ledger.finish_step(
                self.run.record.id,
                event.step,
                state=_STEP_STATES[event.kind],
                detail=detail,
                fence=fence,
                at=event.at,
            )


_STEP_STATES = {
    EventKind.DONE: StepState.OK,
    EventKind.SKIPPED: StepState.SKIPPED,
    EventKind.FAILED: StepState.FAILED,
    EventKind.ERRORED: StepState.ERRORED,
    EventKind.CANCELLED: StepState.ERRORED,
}


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
        self._runs: dict[str, Run] = {}
        self._ledger_reporters: dict[str, LedgerReporter] = {}
        self._waiting: set[str] = set()  # orphaned deploys already told they wait for a manual unlock
        self._stopping = False

    @property
    def config(self) -> FunnelcakeConfig:
        return self.deps.config

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
                    "approval",
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
            await self.emit_for(record, "approval", EventKind.FAILED, message)
            summary = {**_summary(record, None, None), "failed_step": "approval"}
            await self.emit_for(record, SUMMARY_STEP, EventKind.FAILED, message, **summary)
        return record

    async def cancel(self, deploy_id: str, user: str) -> DeployRecord:
        """A person asks to stop a deploy. Recorded in the ledger, so whichever bot runs it acts on it (this
        one at once, another within about a second); a deploy waiting for approval is cancelled outright.
        Returns the record: final if this bot ran it, else still running with the request noted.
        Who may cancel is the caller's policy decision."""
        record = await self.deps.ledger.request_cancel(deploy_id, user)
        run = self._runs.get(deploy_id)
        if run is not None and run.task is not None:
            self._stop(deploy_id, Stop("cancel", by=record.cancel_requested_by or user))
            await asyncio.wait({run.task})
        elif record.state is DeployState.CANCELLED:
            await self.emit_for(record, "approval", EventKind.FAILED, record.message or "cancelled")
            summary = {**_summary(record, None, None), "failed_step": "approval"}
            await self.emit_for(record, SUMMARY_STEP, EventKind.CANCELLED, record.message or "", **summary)
        return await self.deps.ledger.get_deploy(deploy_id)

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

    async def status(self) -> DriftReport:
        return await build_report(self.deps)

    async def history(
        self, env_name: str | None = None, limit: int = 10, *, before: str | None = None
    ) -> list[DeployRecord]:
        return await self.deps.ledger.history(env_name, limit, before=before)

    async def history_page(
        self, env_name: str | None = None, limit: int = 10, *, before: str | None = None
    ) -> tuple[list[DeployRecord], bool]:
        """A page of history, newest first, and whether older deploys remain (the next page: `before` = its last id)."""
        return await self.deps.ledger.history_page(env_name, limit, before=before)

    async def lock(self, env_name: str, user: str, reason: str) -> ManualLock:
        self.config.env(env_name)
        return await self.deps.ledger.lock(env_name, user, reason)

    async def unlock(self, env_name: str, user: str) -> ManualLock | None:
        self.config.env(env_name)
        return await self.deps.ledger.unlock(env_name, user)

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

    async def overlays_at(self, record: DeployRecord) -> bool:
        """Did this deploy's push land although its gitops step was never recorded as done?"""
        tags = await self.deps.gitops.read_tags(self.config, record.envs)
        return bool(record.short) and all(
            set(tags.get(env, {}).values()) == {record.short} for env in record.envs
        )

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
        run.record = await self._write(run, state=state, message=message)
        summary = {**_summary(run.record, None, None), "failed_step": "recovery"}
        await self.emit_for(run.record, SUMMARY_STEP, EventKind.FAILED, message, **summary)
        return run.record

    async def current_tag(self, env_name: str) -> str | None:
        """The api tag the env's overlay holds now."""
        return (await self.deps.gitops.read_tags(self.config, [env_name])).get(env_name, {}).get(Service.API)

    async def rollback_target(self, env_name: str) -> str:
        """Where a rollback goes: the last tag this bot deployed successfully, if the env has moved off it
        since (a failed deploy, or a hand edit of any service's overlay); else the tag before the newest
        deploy; else the newest earlier tag in the overlays' own git history. A tag is a way back only if
        some service does not run it now."""
        current = set((await self.deps.gitops.read_tags(self.config, [env_name])).get(env_name, {}).values())

        def moved_off(tag: str | None) -> bool:
            return bool(tag) and current != {tag}

        last = await self.deps.ledger.last_succeeded(env_name)
        if last is not None and moved_off(last.tags.get(env_name)):
            return last.tags[env_name]
        for record in await self.deps.ledger.history(env_name, 50):
            if not record.kind.changes_tags:
                continue
            previous = record.previous_tags.get(env_name)
            if previous and moved_off(previous):
                return previous
        # Nothing in the ledger (the env was only ever changed by hand): the overlays' own git history.
        env = self.config.env(env_name)
        for service in (Service.API, Service.RELAY):
            for tag in await self.deps.gitops.tag_history(env, service):
                if moved_off(tag):
                    return tag
        raise PermanentError(
            f"no earlier deploy of {env_name} is recorded, so there is nothing to roll back to",
            hint=f"Deploy a known-good commit instead: `/funnelcake deploy {env_name} <commit>`.",
        )

    async def shutdown(self) -> None:
        """A graceful stop: every running deploy is handed over (not cancelled) for another bot to resume."""
        self._stopping = True
        tasks = [t for t in self._tasks.values() if not t.done()]
        for deploy_id in list(self._runs):
            self._stop(deploy_id, Stop("handover"))
        for t in tasks:
            if not t.done():
                t.cancel()  # not yet a run (still claiming): it stops without touching anything
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # ---- the runs -----------------------------------------------------------------------------

    def _spawn(
        self, record: DeployRecord, coro: Coroutine[Any, Any, DeployRecord]
    ) -> asyncio.Task[DeployRecord]:
        # The task copies the context at creation: every log line of this deploy carries its id and envs.
        deploy_id = record.id
        with deploy_context(deploy_id, record.envs):
            task = asyncio.create_task(coro, name=f"deploy-{deploy_id}")
        self._tasks[deploy_id] = task
        task.add_done_callback(lambda t: self._task_done(deploy_id, t))
        return task

    def _task_done(self, deploy_id: str, task: asyncio.Task[DeployRecord]) -> None:
        if self._tasks.get(deploy_id) is task:
            self._tasks.pop(deploy_id, None)
        error = None if task.cancelled() else task.exception()
        if isinstance(error, BotError):
            # Never silent: the recovery pass picks the deploy up again (ours, no task), and the log says why.
            log.warning(
                "deploy %s stopped: %s; the recovery pass takes it up again", deploy_id, error.message
            )
        elif error is not None:
            log.error("deploy %s stopped on an error", deploy_id, exc_info=error)

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

    def _pipeline(self, run: Run, steps: Sequence[Step[DeployContext]]) -> Pipeline[DeployContext]:
        reporters: list[Reporter] = [
            RunTracker(run),
            self._ledger_reporter(run),
            *self.reporters(run.record),
        ]
        return Pipeline(run.record.id, steps, reporters, budgets=self._budgets)

    def _budgets(self, step: str) -> float | None:
        """A step's budget, from the environments file's `timeouts.steps`."""
        return self.config.timeouts.steps.of(step)

    def _ledger_reporter(self, run: Run) -> LedgerReporter:
        reporter = self._ledger_reporters.get(run.record.id)
        if reporter is None or reporter.run is not run:
            reporter = self._ledger_reporters[run.record.id] = LedgerReporter(self, run)
        return reporter

    async def emit_for(
        self, record: DeployRecord, step: str, kind: EventKind, message: str, **data: object
    ) -> None:
        """An event outside any step (a decision, a recovery, the summary), to the record's reporters."""
        reporters = list(self.reporters(record))
        run = self._runs.get(record.id)
        if run is not None:
            reporters.insert(0, self._ledger_reporter(run))
        await Pipeline(record.id, [], reporters)._emit(StepEvent(record.id, step, kind, message, data))
        if step == SUMMARY_STEP:
            _log_finished(record, data)

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
            step = "lock" if isinstance(e, LockHeld) else "approval"
            try:
                run.record = await self._write(run, state=DeployState.FAILED, message=e.message)
            except Fenced as lost:
                await self._lost(run, lost.why)
                return run.record
            summary = {**_summary(run.record, None, None), "failed_step": step, "hint": e.hint}
            await self.emit_for(run.record, SUMMARY_STEP, EventKind.FAILED, e.message, **summary)
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

    def _stop(self, deploy_id: str, stop: Stop) -> None:
        run = self._runs.get(deploy_id)
        if run is None or run.stop is not None or run.task is None or run.task.done():
            return
        run.stop = stop
        run.task.cancel(stop.kind)  # the engine's step line tells why (STOPPED)

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
                run.record, "approval", EventKind.DONE, f"approved by {who(run.record.approver or '?')}"
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

    async def _request_approval(self, run: Run) -> DeployRecord:
        plan = run.ctx.require_plan()
        expires = datetime.now(UTC) + timedelta(seconds=self.config.timeouts.approval)
        await self._flush_ledger(run)
        await self.deps.ledger.request_approval(
            run.record.id, binding=plan.binding(), requester=run.record.requester, expires_at=expires
        )
        run.record = await self.deps.ledger.get_deploy(run.record.id)
        await self.emit_for(
            run.record,
            "approval",
            EventKind.STARTED,
            "waiting for approval",
            plan=plan.to_json(),
            expires_at=expires.isoformat(),
        )
        return run.record

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

    async def _write(self, run: Run, **fields: Any) -> DeployRecord:
        """A write about the run's deploy, as its owner: kept trying while the ledger is unreachable (the lease
        keeper stops the run if that lasts past the lease), refused with Fenced once another bot owns it."""
        await self._flush_ledger(run)
        return await _until_the_ledger_answers(
            lambda: self.deps.ledger.update_deploy(run.record.id, fence=run.record.fence, **fields)
        )

    async def _flush_ledger(self, run: Run) -> None:
        await _until_the_ledger_answers(self._ledger_reporter(run).flush)

    async def _finish(self, run: Run, result: PipelineResult) -> DeployRecord:
        failed = result.failed
        if failed is not None and run.keeper is not None and run.keeper.lost is not None:
            raise Fenced(run.record.id, run.keeper.lost.why)  # the step stopped because the lease was lost
        if failed is None:
            run.record = await self._write(run, state=DeployState.SUCCEEDED, message="deployed")
            await self._clear_failure_lock(run.record)
        else:
            message = f"{failed.step}: {failed.message}"
            run.record = await self._write(run, state=DeployState.FAILED, message=message)
            changed_git = any(r.step == "gitops" and r.outcome is StepOutcome.OK for r in result.results)
            if changed_git:
                await self._lock_after_failure(run.record, failed.step)
        await self.emit_for(
            run.record,
            SUMMARY_STEP,
            EventKind.DONE if failed is None else EventKind.FAILED,
            run.record.message or "",
            **_summary(run.record, run.ctx, result),
        )
        return run.record

    async def _lock_after_failure(self, record: DeployRecord, where: str) -> None:
        for env in record.envs:
            if self.config.env(env).approval_required:
                # A failed production deploy holds production until someone rolls back or unlocks.
                reason = f"deploy {record.id} failed at {where}; roll back or unlock"
                with contextlib.suppress(LockHeld):
                    await self.deps.ledger.lock(env, BOT_USER, reason)

    async def _clear_failure_lock(self, record: DeployRecord) -> None:
        for lock in await self.deps.ledger.locks():
            if lock.env in record.envs and lock.user == BOT_USER:
                await self.deps.ledger.unlock(lock.env, BOT_USER)

    # ---- how a stopped run ends -----------------------------------------------------------------

    async def _stopped(self, run: Run, stop: Stop) -> None:
        try:
            if stop.kind == "handover":
                await self._hand_over(run)
            elif stop.kind == "lost":
                await self._lost(run, stop.why)
            else:
                await self._cancelled(run, stop.by)
        except Fenced as e:
            await self._lost(run, e.why)
        except Exception:
            log.exception("could not record how deploy %s stopped", run.record.id)

    async def _pushed(self, run: Run) -> bool:
        """Did this run's overlays reach the GitOps remote? (Sync and later run only once they have.)"""
        if not run.record.kind.changes_tags:
            return False
        if "gitops" in run.done or run.current in POST_PUSH_STEPS or set(run.done) & set(POST_PUSH_STEPS):
            return True
        if run.current == "gitops":
            return await self.overlays_at(run.record)  # stopped mid-push: the remote tells
        return False

    async def _cancelled(self, run: Run, by: str | None) -> None:
        where = run.where
        by_whom = f" by {who(by)}" if by else ""
        try:
            pushed = await self._pushed(run)
        except Exception:  # noqa: BLE001 - unknown is told as such; the cancel itself must still be recorded
            pushed = None
        short = run.record.short or run.record.ref
        if pushed:
            overlays = " and ".join(f"{env}'s" for env in run.record.envs)
            plural = " is" if len(run.record.envs) == 1 else "s are"
            mid = f"mid-{where}" if where in POST_PUSH_STEPS else f"about to sync (stopped at {where})"
            message = (
                f"cancelled{by_whom} after the GitOps push: {overlays} overlay{plural} at `{short}`, "
                f"the cluster was {mid}"
            )
        elif pushed is None:
            message = (
                f"cancelled{by_whom} at {where}; whether the GitOps push landed is unknown — check `status`"
            )
        else:
            message = f"cancelled{by_whom} at {where}; nothing was pushed"
        run.record = await self._write(run, state=DeployState.CANCELLED, message=message)
        if pushed:
            await self._lock_after_failure(run.record, where)
        summary = {**_summary(run.record, run.ctx, None), "failed_step": where, "pushed": bool(pushed)}
        await self.emit_for(run.record, SUMMARY_STEP, EventKind.CANCELLED, message, **summary)

    async def _hand_over(self, run: Run) -> None:
        where = run.where
        fence = run.record.fence
        if fence is None:
            return
        await self._flush_ledger_briefly(run)
        async with asyncio.timeout(10):
            run.record = await self.deps.ledger.hand_over(run.record.id, fence)
        await self.emit_for(
            run.record,
            "recovery",
            EventKind.PROGRESS,
            f"handed over at {where}: {self.instance_id} is stopping; another bot resumes it",
        )

    async def _flush_ledger_briefly(self, run: Run) -> None:
        with contextlib.suppress(TimeoutError, TransientError):
            async with asyncio.timeout(5):
                await self._flush_ledger(run)

    async def _lost(self, run: Run, why: str) -> None:
        """This bot can no longer prove it owns the deploy: it writes nothing more about it and says so."""
        where = run.where
        await self.emit_for(
            run.record,
            "recovery",
            EventKind.PROGRESS,
            f"{self.instance_id} stopped at {where} and left the deploy to another bot: {why}",
        )

    @property
    def reminder_lead(self) -> timedelta:
        """How long before an approval expires its approvers are reminded: 5 min, or a third of a short window."""
        return timedelta(seconds=min(300.0, self.config.timeouts.approval / 3))

    async def _remind(self, deploy_id: str) -> None:
        record = await self.deps.ledger.get_deploy(deploy_id)
        approval = await self.deps.ledger.get_approval(deploy_id)
        expires = approval.expires_at.isoformat() if approval is not None else ""
        await self.emit_for(
            record,
            "approval",
            EventKind.PROGRESS,
            "reminder: still waiting for an approver",
            reminder=True,
            expires_at=expires,
        )

    async def _announce_expired(self, deploy_id: str) -> None:
        record = await self.deps.ledger.get_deploy(deploy_id)
        seconds = self.config.timeouts.approval
        within = f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
        message = f"approval expired: nobody approved within {within}; deploy again to ask anew"
        await self.emit_for(record, "approval", EventKind.FAILED, message)
        summary = {**_summary(record, None, None), "failed_step": "approval"}
        await self.emit_for(record, SUMMARY_STEP, EventKind.FAILED, message, **summary)


POST_PUSH_STEPS = ("sync", "rollout", "verify")


def _log_started(record: DeployRecord) -> None:
    """The one line that marks a deploy's start (the bot that records it), for log-based queries."""
    with deploy_context(record.id, record.envs):
        log.info(
            "deploy started: %s of %s to %s by %s",
            record.kind.value,
            record.ref,
            ", ".join(record.envs),
            record.requester,
            extra={"deploy_kind": record.kind.value, "ref": record.ref, "requester": record.requester},
        )


def _log_finished(record: DeployRecord, summary: Mapping[str, Any]) -> None:
    """The one line that marks a deploy's end (its final summary): the outcome and how long it took."""
    outcome = str(summary.get("state") or record.state.value)
    seconds = summary.get("seconds")
    took = f" in {seconds:g} s" if isinstance(seconds, int | float) else ""
    where = summary.get("failed_step")
    at = f" at {where}" if where and outcome != DeployState.SUCCEEDED.value else ""
    with deploy_context(record.id, record.envs):
        log.log(
            logging.INFO if outcome == DeployState.SUCCEEDED.value else logging.WARNING,
            "deploy finished: %s%s%s",
            outcome,
            at,
            took,
            extra={
                "deploy_kind": record.kind.value,
                "outcome": outcome,
                "duration_seconds": seconds,
                "failed_step": where,
            },
        )


T = TypeVar("T")


async def _until_the_ledger_answers(write: Callable[[], Awaitable[T]]) -> T:
    """Retry a ledger write through an outage, backing off to 5 s; other errors (Fenced) pass through."""
    delay = 0.2
    while True:
        try:
            return await write()
        except TransientError as e:
            log.warning("%s; retrying in %.1f s", e.message, delay)  # says unreachable, busy or disk full
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _summary(
    record: DeployRecord, ctx: DeployContext | None, result: PipelineResult | None
) -> dict[str, Any]:
    """The final reply's facts: duration, images with digests, the Argo CD revision, where it stopped."""
    failed = result.failed if result else None
    forced = next((r for r in result.results if r.step == "force-migrate"), None) if result else None
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
        "endpoints": {env: summary_line(checks) for env, checks in ctx.endpoints.items()} if ctx else {},
        "failed_step": failed.step if failed else None,
        "hint": failed.hint if failed else None,
        "failure": dict(failed.data) if failed else {},
        # a force-migrate says which version it marked clean and what `up` applied after it
        "force": {"version": forced.data.get("forced"), "applied": list(forced.data.get("applied", []))}
        if forced is not None and forced.outcome is StepOutcome.OK
        else None,
        "rollback_to": {e: ep.previous.get(Service.API.value) for e, ep in ctx.plan.env_plans.items()}
        if ctx and ctx.plan
        else {},
        # refused only for want of the requester's yes to moving back: the thread offers that second yes
        "move_back": downgrade_problems(ctx.plan)
        if ctx and ctx.plan and failed and failed.step == "preflight"
        else [],
    }
