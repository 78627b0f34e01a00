"""What every part of the Ledger shares: the engine and clock, one transaction per call, the env guard,
the dialect's INSERT, and reading deploy records.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, exists, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.errors import LedgerUnavailable
from bot.ledger import schema as s
from bot.ledger.engine import _disk_full, _transient, _unavailable
from bot.ledger.models import DeployRecord, Fence, Fenced, UnknownDeploy
from bot.ledger.rows import _deploy, _fence_why

# One logger name for the whole ledger, as when it was a single module: log lines keep their "logger".
log = logging.getLogger("bot.ledger.store")

Clock = Callable[[], datetime]


class LedgerBase:
    """The Ledger's plumbing; the mixins that make up `Ledger` build on it."""

    def __init__(self, engine: AsyncEngine, *, label: str, clock: Clock, timeout: float) -> None:
        self._engine = engine
        self._label = label
        self._clock = clock
        self._timeout = timeout
        self._pg = engine.dialect.name == "postgresql"

    # ---- plumbing ----

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the ledger clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with asyncio.timeout(self._timeout), self._engine.begin() as conn:
                yield conn
        except TimeoutError:
            raise LedgerUnavailable(
                f"The deploy ledger ({self._label}) did not answer within {self._timeout:g} s",
                reason="timed out",
                hint="it may be overloaded or locked by another process; try again shortly",
            ) from None
        except (sa_exc.DBAPIError, sa_exc.TimeoutError, OSError) as e:
            if isinstance(e, sa_exc.DBAPIError) and not _transient(e) and not _disk_full(e):
                raise
            raise _unavailable(e, self._label) from None

    async def _env_guard(self, conn: AsyncConnection, env: str) -> None:
        # Manual locks and leases of one env must not interleave (lock() racing acquire_lease()).
        # SQLite already runs one writer at a time; PostgreSQL needs the advisory lock.
        if self._pg:
            key = zlib.crc32(env.encode()) - (1 << 31)  # into int4 range
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:ns, :key)"),
                {"ns": s.ENV_LOCK_NAMESPACE, "key": key},
            )

    def _insert(self, table: Any) -> Any:
        # Imported here: each dialect package is ~20 ms of imports, and a process talks to one backend only
        # (a SQLite `funnelcake history` need not load PostgreSQL's, which its engine never loads either).
        if self._pg:
            from sqlalchemy.dialects import postgresql  # noqa: PLC0415

            return postgresql.insert(table)
        from sqlalchemy.dialects import sqlite  # noqa: PLC0415

        return sqlite.insert(table)

    async def _get(self, conn: AsyncConnection, deploy_id: str) -> DeployRecord:
        found = await self._load(conn, [s.deploys.c.id == deploy_id], limit=1)
        if not found:
            raise UnknownDeploy(deploy_id)
        return found[0]

    async def _load(
        self, conn: AsyncConnection, where: Sequence[ColumnElement[bool]], *, limit: int | None
    ) -> list[DeployRecord]:
        q = select(s.deploys).where(*where).order_by(s.deploys.c.created_at.desc(), s.deploys.c.seq.desc())
        if limit is not None:
            q = q.limit(limit)
        rows = (await conn.execute(q)).all()
        if not rows:
            return []
        targets: dict[str, list[Row[Any]]] = {}
        tq = select(s.deploy_targets).where(s.deploy_targets.c.deploy_id.in_([r.id for r in rows]))
        for t in (await conn.execute(tq)).all():
            targets.setdefault(t.deploy_id, []).append(t)
        return [_deploy(r, targets.get(r.id, [])) for r in rows]

    async def _require_deploy(
        self, conn: AsyncConnection, deploy_id: str, fence: Fence | None = None
    ) -> None:
        if fence is not None:
            row = (
                await conn.execute(
                    select(s.deploys.c.owner, s.deploys.c.epoch).where(s.deploys.c.id == deploy_id)
                )
            ).one_or_none()
            if row is None:
                raise UnknownDeploy(deploy_id)
            if (row.owner, row.epoch) != (fence.owner, fence.epoch):
                raise Fenced(deploy_id, _fence_why(row.owner, row.epoch))
            return
        if not (await conn.execute(select(exists().where(s.deploys.c.id == deploy_id)))).scalar():
            raise UnknownDeploy(deploy_id)
