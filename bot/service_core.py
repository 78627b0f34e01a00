"""The deploy service's core: its state, the tasks its runs live in, their pipelines and reporters,
and the owner's writes to the ledger. The base of DeployService (bot/service.py); split out of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from bot.errors import BotError
from bot.ledger.models import (
    DeployRecord,
    LockHeld,
)
from bot.ledger_reporter import LedgerReporter
from bot.logs import deploy_context
from bot.models import BOT_USER, DeployKind
from bot.outcomes import _log_finished, _until_the_ledger_answers
from bot.pipeline.context import DeployContext, Deps
from bot.pipeline.engine import Pipeline, Reporter, Step, StepEvent
from bot.pipeline.events import DeploySummary
from bot.pipeline.vocab import EventKind
from bot.runs import Run, RunTracker
from bot.settings import FunnelcakeConfig

ReporterFactory = Callable[[DeployRecord], Sequence[Reporter]]

log = logging.getLogger("bot.service")  # the service's logger, as before the split


class ServiceCore:
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
        self,
        record: DeployRecord,
        step: str,
        kind: EventKind,
        message: str,
        *,
        summary: DeploySummary | None = None,
        **data: object,
    ) -> None:
        """An event outside any step (a decision, a recovery, the run's summary), to the record's reporters."""
        reporters = list(self.reporters(record))
        run = self._runs.get(record.id)
        if run is not None:
            reporters.insert(0, self._ledger_reporter(run))
        event = StepEvent(record.id, step, kind, message, data, payload=summary)
        if summary is not None:
            # logged before any reporter awaits: the record is already final, so a stop that follows at
            # once (a rolling restart) must not lose the line that marks the deploy's end
            _log_finished(record, summary)
        await Pipeline(record.id, [], reporters)._emit(event)

    async def _write(self, run: Run, **fields: Any) -> DeployRecord:
        """A write about the run's deploy, as its owner: kept trying while the ledger is unreachable (the lease
        keeper stops the run if that lasts past the lease), refused with Fenced once another bot owns it."""
        await self._flush_ledger(run)
        return await _until_the_ledger_answers(
            lambda: self.deps.ledger.update_deploy(run.record.id, fence=run.record.fence, **fields)
        )

    async def _flush_ledger(self, run: Run) -> None:
        await _until_the_ledger_answers(self._ledger_reporter(run).flush)

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
