"""Env leases with epochs: acquire, heartbeat, prove (the fencing check before a side effect), release."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import and_, case, or_, select, update

from bot.ledger import schema as s
from bot.ledger.base import LedgerBase, log
from bot.ledger.models import DeployRecord, Fence, Fenced, Lease, LockHeld, UnknownDeploy
from bot.ledger.rows import _lease, _lease_why, _lock


class LeasesMixin(LedgerBase):
    # ---- leases ----

    async def acquire_lease(
        self,
        env: str,
        *,
        holder: str,
        deploy_id: str,
        ttl: float,
        ignore_lock_by: str | None = None,
    ) -> Lease:
        """Take the env for a deploy, or take over a lapsed or released lease; LockHeld if a lock or a live
        lease is in the way.

        Re-acquiring a live lease by the same holder for the same deploy renews it at the same epoch;
        every other acquisition moves the env's epoch on, so whoever held it before is fenced out. A manual
        lock set by `ignore_lock_by` does not block (a rollback is the way out of the bot's failed-deploy
        lock); the lock stays in place.
        """
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        now = self._now()
        expires = now + timedelta(seconds=ttl)
        c = s.leases.c
        async with self._tx() as conn:
            await self._env_guard(conn, env)
            lock = (await conn.execute(select(s.locks).where(s.locks.c.env == env))).one_or_none()
            if lock is not None and (ignore_lock_by is None or lock.user != ignore_lock_by):
                raise LockHeld.for_lock(_lock(lock), now)
            before = (await conn.execute(select(s.leases).where(c.env == env))).one_or_none()
            live_mine = and_(
                c.holder == holder, c.deploy_id == deploy_id, c.expires_at > now, c.released_at.is_(None)
            )
            ins = self._insert(s.leases).values(
                env=env,
                holder=holder,
                deploy_id=deploy_id,
                acquired_at=now,
                expires_at=expires,
                heartbeat_at=now,
                epoch=1,
                released_at=None,
            )
            # One statement decides the race: a new row, a lapsed or released lease taken, or our own renewed.
            ins = ins.on_conflict_do_update(
                index_elements=[c.env],
                set_={
                    "holder": ins.excluded.holder,
                    "deploy_id": ins.excluded.deploy_id,
                    "acquired_at": case((live_mine, c.acquired_at), else_=ins.excluded.acquired_at),
                    "expires_at": ins.excluded.expires_at,
                    "heartbeat_at": ins.excluded.heartbeat_at,
                    "epoch": case((live_mine, c.epoch), else_=c.epoch + 1),
                    "released_at": None,
                },
                where=or_(c.expires_at <= now, c.released_at.is_not(None), live_mine),
            ).returning(*s.leases.c)
            row = (await conn.execute(ins)).one_or_none()
            if row is None:
                current = (await conn.execute(select(s.leases).where(c.env == env))).one()
                lease = _lease(current)
                try:
                    deploy: DeployRecord | None = await self._get(conn, lease.deploy_id)
                except UnknownDeploy:
                    deploy = None
                raise LockHeld.for_lease(lease, deploy, now)
            taken_over = None
            if (
                before is not None
                and before.released_at is None
                and (before.holder, before.deploy_id) != (holder, deploy_id)
            ):
                taken_over = before.deploy_id
                log.warning(
                    "took over a lapsed lease",
                    extra={"env": env, "from_deploy": before.deploy_id, "from_holder": before.holder},
                )
            return _lease(row, taken_over_from=taken_over)

    async def prove(self, deploy_id: str, fence: Fence, leases: Sequence[Lease], *, ttl: float) -> datetime:
        """The check before a side effect: this owner still owns the deploy at its epoch and holds each
        lease at its epoch, unexpired. Renews the leases; returns their new expiry. Fenced otherwise."""
        now = self._now()
        c = s.leases.c
        expires = now + timedelta(seconds=ttl)
        async with self._tx() as conn:
            await self._require_deploy(conn, deploy_id, fence)
            for lease in leases:
                result = await conn.execute(
                    update(s.leases)
                    .where(
                        c.env == lease.env,
                        c.holder == fence.owner,
                        c.deploy_id == deploy_id,
                        c.epoch == lease.epoch,
                        c.expires_at > now,
                        c.released_at.is_(None),
                    )
                    .values(expires_at=expires, heartbeat_at=now)
                )
                if not result.rowcount:
                    row = (await conn.execute(select(s.leases).where(c.env == lease.env))).one_or_none()
                    raise Fenced(deploy_id, _lease_why(lease, row, now))
            return expires

    async def release_lease(self, env: str, holder: str, *, epoch: int | None = None) -> bool:
        """Free the env. The row stays (released) so the env's epoch never goes back."""
        c = s.leases.c
        async with self._tx() as conn:
            stmt = update(s.leases).where(c.env == env, c.holder == holder, c.released_at.is_(None))
            if epoch is not None:
                stmt = stmt.where(c.epoch == epoch)
            result = await conn.execute(stmt.values(released_at=self._now()))
            return bool(result.rowcount)

    async def get_lease(self, env: str) -> Lease | None:
        """The env's lease unless it was released (a lapsed one is returned: its holder may be dead)."""
        c = s.leases.c
        async with self._tx() as conn:
            row = (
                await conn.execute(select(s.leases).where(c.env == env, c.released_at.is_(None)))
            ).one_or_none()
            return _lease(row) if row is not None else None

    async def leases(self) -> list[Lease]:
        c = s.leases.c
        async with self._tx() as conn:
            q = select(s.leases).where(c.released_at.is_(None)).order_by(c.env)
            return [_lease(r) for r in (await conn.execute(q)).all()]
