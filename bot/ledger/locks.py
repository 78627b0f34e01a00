"""Manual env locks and their audit trail."""

from __future__ import annotations

from sqlalchemy import delete, select, update

from bot.ledger import schema as s
from bot.ledger.base import LedgerBase
from bot.ledger.models import LockHeld, ManualLock
from bot.ledger.rows import _lock


class LocksMixin(LedgerBase):
    # ---- manual locks ----

    async def lock(self, env: str, user: str, reason: str) -> ManualLock:
        """Lock an env against new deploys. LockHeld if someone else locked it; the same user updates the reason."""
        reason = reason.strip() or "no reason given"
        now = self._now()
        async with self._tx() as conn:
            await self._env_guard(conn, env)
            row = (await conn.execute(select(s.locks).where(s.locks.c.env == env))).one_or_none()
            if row is not None and row.user != user:
                raise LockHeld.for_lock(_lock(row), now)
            if row is None:
                await conn.execute(s.locks.insert().values(env=env, user=user, reason=reason, since=now))
            else:
                await conn.execute(update(s.locks).where(s.locks.c.env == env).values(reason=reason))
            await conn.execute(
                s.lock_events.insert().values(env=env, action="lock", user=user, reason=reason, at=now)
            )
            out = (await conn.execute(select(s.locks).where(s.locks.c.env == env))).one()
            return _lock(out)

    async def unlock(self, env: str, user: str) -> ManualLock | None:
        """Remove the env's manual lock (who may do so is the service's policy); the removed lock, or None."""
        now = self._now()
        async with self._tx() as conn:
            await self._env_guard(conn, env)
            row = (
                await conn.execute(delete(s.locks).where(s.locks.c.env == env).returning(*s.locks.c))
            ).one_or_none()
            if row is None:
                return None
            await conn.execute(
                s.lock_events.insert().values(env=env, action="unlock", user=user, reason=row.reason, at=now)
            )
            return _lock(row)

    async def locks(self) -> list[ManualLock]:
        async with self._tx() as conn:
            return [_lock(r) for r in (await conn.execute(select(s.locks).order_by(s.locks.c.env))).all()]
