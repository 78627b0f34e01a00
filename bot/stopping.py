"""How a deploy is stopped and how a stopped run ends: a cancel, a hand-over on a graceful stop, or a
lost lease. A layer of DeployService, split out of bot/service.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from bot.errors import TransientError
from bot.ledger.models import (
    DeployRecord,
    DeployState,
    Fenced,
    who,
)
from bot.lookups import Lookups
from bot.outcomes import deploy_summary
from bot.pipeline.vocab import POST_PUSH_STEPS, SUMMARY_STEP, EventKind, StepName
from bot.runs import Run, Stop

log = logging.getLogger("bot.service")  # the service's logger, as before the split


class Stopping(Lookups):
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
            await self.emit_for(record, StepName.APPROVAL, EventKind.FAILED, record.message or "cancelled")
            summary = deploy_summary(record, None, None, failed_step=StepName.APPROVAL)
            await self.emit_for(
                record, SUMMARY_STEP, EventKind.CANCELLED, record.message or "", summary=summary
            )
        return await self.deps.ledger.get_deploy(deploy_id)

    async def shutdown(self) -> None:
        """A graceful stop: every running deploy is handed over (not cancelled) for another bot to resume."""
        self._stopping = True
        tasks = [t for t in self._tasks.values() if not t.done()]
        for deploy_id in list(self._runs):
            self._stop(deploy_id, Stop("handover"))
        runs = {run.task for run in self._runs.values()}
        for t in tasks:
            if t not in runs:
                t.cancel()  # not yet a run (still claiming): it stops without touching anything
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _stop(self, deploy_id: str, stop: Stop) -> None:
        run = self._runs.get(deploy_id)
        if run is None or run.stop is not None or run.task is None or run.task.done():
            return
        if run.ending and stop.kind != "lost":
            # it is telling its end: a cancel or a hand-over would only cut that off (a lost lease still stops it)
            return
        run.stop = stop
        run.task.cancel(stop.kind)  # the engine's step line tells why (STOPPED)

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
        if (
            StepName.GITOPS in run.done
            or run.current in POST_PUSH_STEPS
            or set(run.done) & set(POST_PUSH_STEPS)
        ):
            return True
        if run.current == StepName.GITOPS:
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
        summary = deploy_summary(run.record, run.ctx, None, failed_step=where, pushed=bool(pushed))
        await self.emit_for(run.record, SUMMARY_STEP, EventKind.CANCELLED, message, summary=summary)

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
            StepName.RECOVERY,
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
            StepName.RECOVERY,
            EventKind.PROGRESS,
            f"{self.instance_id} stopped at {where} and left the deploy to another bot: {why}",
        )
