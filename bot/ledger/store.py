"""The ledger: deploy history, env leases and manual locks, and approvals, on SQLite or PostgreSQL.

Every method runs in one short transaction under a deadline and returns plain dataclasses. Cross-process
safety comes from the database, not from this process: conditional writes (INSERT … ON CONFLICT DO UPDATE
… WHERE, UPDATE … WHERE state = …) decide races, SQLite begins every transaction IMMEDIATE so a writer
never upgrades a stale read, and PostgreSQL serialises lock/lease changes of one env with an advisory lock.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from sqlalchemy import exc as sa_exc

from bot.errors import LedgerUnavailable
from bot.ledger import schema as s
from bot.ledger.approvals import ApprovalsMixin
from bot.ledger.base import Clock, LedgerBase, log
from bot.ledger.deploys import DeploysMixin, DeployUpdate, new_deploy_id
from bot.ledger.engine import (
    _normalise_url,
    _postgres_engine,
    _refused,
    _short_cause,
    _sqlite_engine,
    _unopenable,
)
from bot.ledger.incidents import IncidentsMixin
from bot.ledger.leases import LeasesMixin
from bot.ledger.locks import LocksMixin
from bot.ledger.steps import StepsMixin

__all__ = ["Clock", "DeployUpdate", "Ledger", "new_deploy_id"]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Ledger(DeploysMixin, StepsMixin, LeasesMixin, LocksMixin, IncidentsMixin, ApprovalsMixin, LedgerBase):
    """Async access to the ledger database. Build with `await Ledger.open(url)`; `close()` when done."""

    # ---- lifecycle ----

    @classmethod
    async def open(cls, url: str, *, clock: Clock | None = None, query_timeout: float = 10.0) -> Ledger:
        """Connect, create or upgrade the schema, and return a ready ledger. `query_timeout` bounds every query."""
        sa_url, label = _normalise_url(url)
        if sa_url.get_backend_name() == "sqlite":
            engine = await _sqlite_engine(sa_url, query_timeout)
        else:
            engine = _postgres_engine(sa_url, query_timeout)
        ledger = cls(engine, label=label, clock=clock or _utc_now, timeout=query_timeout)
        try:
            applied = await ledger._upgrade()
        except LedgerUnavailable as e:
            await engine.dispose()
            if e.reason == "file cannot be opened":  # at open that is the path, not an outage
                raise _unopenable(Path(sa_url.database or "")) from None
            raise
        except sa_exc.DBAPIError as e:
            await engine.dispose()
            log.warning("the ledger's database refused to open it: %s", _short_cause(e))
            raise _refused(e, sa_url) from None
        except BaseException:
            await engine.dispose()
            raise
        if applied:
            log.info("ledger schema upgraded", extra={"versions": applied, "database": label})
        return ledger

    async def close(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _upgrade(self) -> list[int]:
        now = self._clock()
        async with self._tx() as conn:
            return await conn.run_sync(lambda c: s.upgrade(c, now=now))

    async def schema_version(self) -> int:
        async with self._tx() as conn:
            return await conn.run_sync(s.current_version)
