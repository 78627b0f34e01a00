"""Approvals: which deploys need one, asking for it, reminding its approvers and telling its expiry.
A layer of DeployService, split out of bot/service.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bot.ledger.models import (
    DeployRecord,
)
from bot.models import DeployKind
from bot.outcomes import deploy_summary
from bot.pipeline.vocab import SUMMARY_STEP, EventKind, StepName
from bot.runs import Run
from bot.stopping import Stopping


class Approvals(Stopping):
    def _needs_approval(self, record: DeployRecord) -> bool:
        if record.kind is DeployKind.ROLLBACK:
            return False  # back to a tag that already ran there; speed matters more than a second click
        return any(self.config.env(e).approval_required for e in record.envs)

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
            StepName.APPROVAL,
            EventKind.STARTED,
            "waiting for approval",
            plan=plan.to_json(),
            expires_at=expires.isoformat(),
        )
        return run.record

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
            StepName.APPROVAL,
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
        await self.emit_for(record, StepName.APPROVAL, EventKind.FAILED, message)
        summary = deploy_summary(record, None, None, failed_step=StepName.APPROVAL)
        await self.emit_for(record, SUMMARY_STEP, EventKind.FAILED, message, summary=summary)
