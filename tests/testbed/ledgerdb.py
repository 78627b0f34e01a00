"""Reads of ledger tables the bot writes but never reads back, straight from the database (as an auditor
would with SQL)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from bot.ledger import schema


async def lock_events(database_url: str, env: str) -> list[tuple[str, str]]:
    """The env's manual-lock audit trail, newest first, as (action, user)."""
    c = schema.lock_events.c
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(c.action, c.user).where(c.env == env).order_by(c.at.desc(), c.id.desc())
            )
            return [(r.action, r.user) for r in rows]
    finally:
        await engine.dispose()
