"""Incidents: the watcher's findings outside any deploy."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from bot.ledger import schema as s
from bot.ledger.base import LedgerBase
from bot.ledger.models import IncidentRecord
from bot.ledger.rows import _incident


class IncidentsMixin(LedgerBase):
    # ---- incidents (the watcher's findings outside any deploy) ----

    async def open_incident(
        self, env: str, kind: str, key: str, title: str, detail: dict[str, Any]
    ) -> tuple[IncidentRecord, bool]:
        """The open incident with this key, or a new one; True when it was opened now."""
        c = s.incidents.c
        now = self._now()
        async with self._tx() as conn:
            await self._env_guard(conn, f"incident:{key}")
            row = (await conn.execute(select(s.incidents).where(c.key == key, c.closed_at.is_(None)))).first()
            if row is not None:
                return _incident(row), False
            new = (
                await conn.execute(
                    s.incidents.insert()
                    .values(
                        env=env, kind=kind, key=key, title=title, detail=detail, opened_at=now, updated_at=now
                    )
                    .returning(*s.incidents.c)
                )
            ).one()
            return _incident(new), True

    async def update_incident(self, incident_id: int, **fields: Any) -> IncidentRecord:
        """Change an incident's title, detail, channel or message_ts; `closed=True` closes it now, `reopen=True`
        opens it again (it came back soon after it ended)."""
        allowed = {"title", "detail", "channel", "message_ts"}
        unknown = set(fields) - allowed - {"closed", "reopen"}
        if unknown:
            raise ValueError(f"unknown incident field(s): {', '.join(sorted(unknown))}")
        now = self._now()
        values: dict[str, Any] = {k: v for k, v in fields.items() if k in allowed}
        values["updated_at"] = now
        if fields.get("closed"):
            values["closed_at"] = now
        if fields.get("reopen"):
            values["closed_at"] = None
        c = s.incidents.c
        async with self._tx() as conn:
            await conn.execute(update(s.incidents).where(c.id == incident_id).values(**values))
            return _incident((await conn.execute(select(s.incidents).where(c.id == incident_id))).one())

    async def incidents(
        self, *, open_only: bool = True, env: str | None = None, limit: int = 100
    ) -> list[IncidentRecord]:
        c = s.incidents.c
        q = select(s.incidents).order_by(c.opened_at.desc(), c.id.desc()).limit(limit)
        if open_only:
            q = q.where(c.closed_at.is_(None))
        if env is not None:
            q = q.where(c.env == env)
        async with self._tx() as conn:
            return [_incident(r) for r in (await conn.execute(q)).all()]
