"""A deploy's steps, and retention of old step rows."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, exists, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.ledger import schema as s
from bot.ledger.base import LedgerBase
from bot.ledger.models import IN_FLIGHT_STATES, Fence, StepRecord, StepState
from bot.ledger.rows import _step


class StepsMixin(LedgerBase):
    # ---- steps ----

    async def record_step(
        self,
        deploy_id: str,
        step: str,
        *,
        env: str | None = None,
        state: StepState = StepState.RUNNING,
        detail: dict[str, Any] | None = None,
        fence: Fence | None = None,
        at: datetime | None = None,
    ) -> StepRecord:
        """Start a step (or record one already finished, e.g. skipped). Finished ok/skipped moves last_step.

        `at` is when it happened, for events written late (kept while the ledger was unreachable)."""
        state = StepState(state)
        now = at or self._now()
        async with self._tx() as conn:
            await self._require_deploy(conn, deploy_id, fence)
            result = await conn.execute(
                s.deploy_steps.insert()
                .values(
                    deploy_id=deploy_id,
                    env=env,
                    step=step,
                    state=state.value,
                    started_at=now,
                    finished_at=None if state is StepState.RUNNING else now,
                    detail=detail,
                )
                .returning(*s.deploy_steps.c)
            )
            row = result.one()
            await self._touch(conn, deploy_id, step, state, now)
            return _step(row)

    async def finish_step(
        self,
        deploy_id: str,
        step: str,
        *,
        state: StepState,
        env: str | None = None,
        detail: dict[str, Any] | None = None,
        fence: Fence | None = None,
        at: datetime | None = None,
    ) -> StepRecord:
        """Finish the newest running attempt of the step (or record it finished if it never started)."""
        state = StepState(state)
        if state is StepState.RUNNING:
            raise ValueError("finish_step needs a final state (ok, failed, errored or skipped)")
        now = at or self._now()
        c = s.deploy_steps.c
        same = and_(
            c.deploy_id == deploy_id, c.step == step, c.env.is_(None) if env is None else c.env == env
        )
        async with self._tx() as conn:
            await self._require_deploy(conn, deploy_id, fence)
            latest = (
                await conn.execute(
                    select(c.id)
                    .where(same, c.state == StepState.RUNNING.value)
                    .order_by(c.id.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            if latest is None:
                stmt: Any = s.deploy_steps.insert().values(
                    deploy_id=deploy_id,
                    env=env,
                    step=step,
                    state=state.value,
                    started_at=now,
                    finished_at=now,
                    detail=detail,
                )
            else:
                values: dict[str, Any] = {"state": state.value, "finished_at": now}
                if detail is not None:
                    values["detail"] = detail
                stmt = update(s.deploy_steps).where(c.id == latest).values(**values)
            row = (await conn.execute(stmt.returning(*s.deploy_steps.c))).one()
            await self._touch(conn, deploy_id, step, state, now)
            return _step(row)

    async def steps(self, deploy_id: str) -> list[StepRecord]:
        c = s.deploy_steps.c
        async with self._tx() as conn:
            rows = (
                await conn.execute(select(s.deploy_steps).where(c.deploy_id == deploy_id).order_by(c.id))
            ).all()
            return [_step(r) for r in rows]

    async def prune_steps(self, keep_days: float, *, batch: int = 5000) -> int:
        """Delete the step rows of finished deploys whose step finished more than `keep_days` days ago; the
        deploy records (and their targets, approvals) are never deleted. Works in short transactions of at
        most `batch` rows, so a large backlog never holds the write lock for long. Returns how many went."""
        if keep_days <= 0:
            raise ValueError(f"keep_days must be positive, not {keep_days}")
        cutoff = self._now() - timedelta(days=keep_days)
        c = s.deploy_steps.c
        finished = ~exists().where(
            s.deploys.c.id == c.deploy_id, s.deploys.c.state.in_([x.value for x in IN_FLIGHT_STATES])
        )
        total = 0
        while True:
            async with self._tx() as conn:
                ids = list(
                    (
                        await conn.execute(
                            select(c.id)
                            .where(c.finished_at.is_not(None), c.finished_at < cutoff, finished)
                            .order_by(c.finished_at)
                            .limit(batch)
                        )
                    ).scalars()
                )
                if ids:
                    await conn.execute(delete(s.deploy_steps).where(c.id.in_(ids)))
            total += len(ids)
            if len(ids) < batch:
                return total
            await asyncio.sleep(0)  # let the deploys' own writes in between batches

    async def _touch(
        self, conn: AsyncConnection, deploy_id: str, step: str, state: StepState, now: datetime
    ) -> None:
        values: dict[str, Any] = {"updated_at": now}
        if state in (StepState.OK, StepState.SKIPPED):
            values["last_step"] = step
        await conn.execute(update(s.deploys).where(s.deploys.c.id == deploy_id).values(**values))
