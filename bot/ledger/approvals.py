"""Plan-bound approvals: request, decide (first click wins), per-env approvals, expiry and reminders."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.ledger import schema as s
from bot.ledger.base import LedgerBase
from bot.ledger.models import (
    AlreadyDecided,
    Approval,
    ApprovalExpired,
    ApprovalState,
    ApprovalVoid,
    Decision,
    DecisionKind,
    DeployState,
    LedgerError,
    NoApproval,
    StateConflict,
    who,
)
from bot.ledger.rows import _approval, _decision


class ApprovalsMixin(LedgerBase):
    # ---- approvals ----

    async def request_approval(
        self, deploy_id: str, *, binding: str, requester: str, expires_at: datetime
    ) -> Approval:
        """Open (or, after a re-plan, reopen) the approval for a deploy and mark the deploy awaiting approval.

        A denial is final: asking again raises AlreadyDecided.
        """
        now = self._now()
        a = s.approvals.c
        async with self._tx() as conn:
            deploy = await self._get(conn, deploy_id)
            if deploy.state.terminal:
                raise StateConflict(deploy_id, deploy.state, (DeployState.PLANNED, DeployState.RUNNING))
            row = (await conn.execute(select(s.approvals).where(a.deploy_id == deploy_id))).one_or_none()
            if row is not None and row.state == ApprovalState.DENIED:
                raise AlreadyDecided(deploy_id, row.decided_by, "deny", row.decided_at)
            values = {
                "binding": binding,
                "requester": requester,
                "requested_at": now,
                "expires_at": expires_at,
                "state": ApprovalState.PENDING.value,
                "decided_by": None,
                "decided_at": None,
            }
            if row is None:
                await conn.execute(s.approvals.insert().values(deploy_id=deploy_id, **values))
            else:
                await conn.execute(update(s.approvals).where(a.deploy_id == deploy_id).values(**values))
            await conn.execute(
                update(s.deploys)
                .where(s.deploys.c.id == deploy_id)
                .values(state=DeployState.AWAITING_APPROVAL.value, approver=None, updated_at=now)
            )
            return _approval((await conn.execute(select(s.approvals).where(a.deploy_id == deploy_id))).one())

    async def decide(
        self,
        deploy_id: str,
        *,
        user: str,
        decision: DecisionKind,
        binding: str,
        now: datetime | None = None,
    ) -> Decision:
        """Record the first decision on a pending approval; every later click gets an explanation instead.

        Raises AlreadyDecided, ApprovalExpired (and marks the approval and deploy expired), ApprovalVoid
        (the binding differs: the plan changed; the approval is voided) or NoApproval.
        """
        if decision not in ("approve", "deny"):
            raise ValueError(f"decision must be 'approve' or 'deny', not {decision!r}")
        if now is not None and now.tzinfo is None:
            raise ValueError("decide(now=...) must be timezone-aware")
        at = (now or self._now()).astimezone(UTC)
        a = s.approvals.c
        new_state = ApprovalState.APPROVED if decision == "approve" else ApprovalState.DENIED
        refusal: LedgerError
        async with self._tx() as conn:
            # The conditional UPDATE is the whole race: only one click finds the row still pending.
            won = (
                await conn.execute(
                    update(s.approvals)
                    .where(
                        a.deploy_id == deploy_id,
                        a.state == ApprovalState.PENDING.value,
                        a.expires_at > at,
                        a.binding == binding,
                        # a deploy cancelled while it waited has nothing left to approve
                        exists().where(
                            s.deploys.c.id == deploy_id,
                            s.deploys.c.state == DeployState.AWAITING_APPROVAL.value,
                        ),
                    )
                    .values(state=new_state.value, decided_by=user, decided_at=at)
                    .returning(a.deploy_id)
                )
            ).one_or_none()
            if won is not None:
                if decision == "approve":
                    deploy_values: dict[str, Any] = {"approver": user, "updated_at": at}
                else:
                    deploy_values = {
                        "state": DeployState.DENIED.value,
                        "message": f"denied by {who(user)}",
                        "updated_at": at,
                        "finished_at": at,
                    }
                await conn.execute(
                    update(s.deploys).where(s.deploys.c.id == deploy_id).values(**deploy_values)
                )
                return Decision(deploy_id=deploy_id, decision=decision, user=user, at=at)
            row = (await conn.execute(select(s.approvals).where(a.deploy_id == deploy_id))).one_or_none()
            if row is None:
                refusal = NoApproval(deploy_id, None)
            elif row.state in (ApprovalState.APPROVED, ApprovalState.DENIED):
                refusal = AlreadyDecided(deploy_id, row.decided_by, _decision(row.state), row.decided_at)
            elif row.state == ApprovalState.EXPIRED or row.expires_at <= at:
                await self._expire(conn, [deploy_id], at)
                refusal = ApprovalExpired(deploy_id, row.expires_at)
            elif row.state == ApprovalState.VOID:
                refusal = ApprovalVoid(deploy_id, approved=False)
            elif (deploy := await self._get(conn, deploy_id)).state is not DeployState.AWAITING_APPROVAL:
                refusal = StateConflict(deploy_id, deploy.state, (DeployState.AWAITING_APPROVAL,))
            else:
                await conn.execute(
                    update(s.approvals)
                    .where(a.deploy_id == deploy_id, a.state == ApprovalState.PENDING.value)
                    .values(state=ApprovalState.VOID.value)
                )
                refusal = ApprovalVoid(deploy_id, approved=False)
        # Raised after the commit so an expiry or voiding found on the way is kept.
        raise refusal

    async def approve_envs(self, deploy_id: str, envs: Sequence[str], *, user: str) -> dict[str, str]:
        """Record `user`'s approval of each of `envs` not yet approved (a multi-env request needs one approver
        per env that requires approval); returns every approved env of the deploy and by whom."""
        c = s.env_approvals.c
        at = self._now()
        async with self._tx() as conn:
            rows = (await conn.execute(select(s.env_approvals.c.env).where(c.deploy_id == deploy_id))).all()
            fresh = [e for e in dict.fromkeys(envs) if e not in {r.env for r in rows}]
            if fresh:
                # Two approvers of one env at once: the first row stays (the first decision wins).
                await conn.execute(
                    self._insert(s.env_approvals).on_conflict_do_nothing(index_elements=["deploy_id", "env"]),
                    [
                        {"deploy_id": deploy_id, "env": e, "approved_by": user, "approved_at": at}
                        for e in fresh
                    ],
                )
            approved = (await conn.execute(select(s.env_approvals).where(c.deploy_id == deploy_id))).all()
            return {r.env: r.approved_by for r in approved}

    async def verify_approval(self, deploy_id: str, *, binding: str) -> Approval:
        """Just before running: the approval must be approved and bound to the plan about to run."""
        a = s.approvals.c
        refusal: LedgerError
        async with self._tx() as conn:
            row = (await conn.execute(select(s.approvals).where(a.deploy_id == deploy_id))).one_or_none()
            if row is None or row.state != ApprovalState.APPROVED:
                refusal = NoApproval(deploy_id, ApprovalState(row.state) if row is not None else None)
            elif row.binding != binding:
                await conn.execute(
                    update(s.approvals).where(a.deploy_id == deploy_id).values(state=ApprovalState.VOID.value)
                )
                refusal = ApprovalVoid(deploy_id, approved=True)
            else:
                return _approval(row)
        raise refusal

    async def get_approval(self, deploy_id: str) -> Approval | None:
        """The approval as stored, except that a pending one past its deadline reads as expired."""
        now = self._now()
        async with self._tx() as conn:
            row = (
                await conn.execute(select(s.approvals).where(s.approvals.c.deploy_id == deploy_id))
            ).one_or_none()
            if row is None:
                return None
            out = _approval(row)
            if out.state is ApprovalState.PENDING and out.expires_at <= now:
                return _approval(row, state=ApprovalState.EXPIRED)
            return out

    async def expire_approvals(self) -> list[str]:
        """Expire every pending approval past its deadline (and its deploy); return the deploy ids."""
        now = self._now()
        a = s.approvals.c
        async with self._tx() as conn:
            due = list(
                (
                    await conn.execute(
                        select(a.deploy_id).where(a.state == ApprovalState.PENDING.value, a.expires_at <= now)
                    )
                ).scalars()
            )
            await self._expire(conn, due, now)
            return due

    async def claim_reminders(self, within: timedelta) -> list[str]:
        """Pending approvals that expire within `within` and were not reminded yet: marked reminded and
        returned, in one conditional update, so of several bots exactly one reminds each approval once."""
        now = self._now()
        a = s.approvals.c
        async with self._tx() as conn:
            rows = await conn.execute(
                update(s.approvals)
                .where(
                    a.state == ApprovalState.PENDING.value,
                    a.reminded_at.is_(None),
                    a.expires_at > now,
                    a.expires_at <= now + within,
                )
                .values(reminded_at=now)
                .returning(a.deploy_id)
            )
            return list(rows.scalars())

    async def _expire(self, conn: AsyncConnection, deploy_ids: list[str], now: datetime) -> None:
        if not deploy_ids:
            return
        a = s.approvals.c
        await conn.execute(
            update(s.approvals)
            .where(a.deploy_id.in_(deploy_ids), a.state == ApprovalState.PENDING.value)
            .values(state=ApprovalState.EXPIRED.value)
        )
        await conn.execute(
            update(s.deploys)
            .where(
                s.deploys.c.id.in_(deploy_ids),
                s.deploys.c.state == DeployState.AWAITING_APPROVAL.value,
            )
            .values(
                state=DeployState.EXPIRED.value,
                message="the approval request expired",
                updated_at=now,
                finished_at=now,
            )
        )
