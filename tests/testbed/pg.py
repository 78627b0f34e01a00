"""Throwaway PostgreSQL databases on the machine's server (127.0.0.1:5432) for ledger and failover tests.

`ThrowawayPostgres` works outside pytest too (`async with ThrowawayPostgres() as db: db.url`). The
fixtures are imported by the test modules that need them: `pg_database` is one database for the
session (reset per test by the caller), `postgres` a fresh one per test, dropped after it.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest

__all__ = ["PG_ADMIN_DSN", "PG_HOST", "PG_PORT", "ThrowawayPostgres", "pg_database", "postgres"]

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_ADMIN_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
CONNECT_TIMEOUT = 5.0


class ThrowawayPostgres:
    """A database created on the local PostgreSQL, dropped (with its connections) at stop()."""

    def __init__(self, admin_dsn: str = PG_ADMIN_DSN) -> None:
        self.admin_dsn = admin_dsn
        self.name = f"funnelcake_test_{secrets.token_hex(4)}"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL the ledger (and DATABASE_URL) takes."""
        return f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/{self.name}"

    @property
    def dsn(self) -> str:
        """The plain libpq DSN, for asyncpg."""
        return self.admin_dsn.rsplit("/", 1)[0] + "/" + self.name

    async def start(self) -> None:
        try:
            conn = await asyncpg.connect(self.admin_dsn, timeout=CONNECT_TIMEOUT)
        except (OSError, asyncpg.PostgresError) as e:
            raise RuntimeError(
                f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} as user postgres ({e!r}); "
                "these tests need it (this machine runs one: check `pg_isready -h 127.0.0.1`)"
            ) from e
        try:
            await conn.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await conn.close()

    async def reset(self) -> None:
        """Empty the database: the next ledger opened on it creates its schema from scratch."""
        conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()

    async def stop(self) -> None:
        conn = await asyncpg.connect(self.admin_dsn, timeout=CONNECT_TIMEOUT)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await conn.close()

    async def __aenter__(self) -> ThrowawayPostgres:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[ThrowawayPostgres]:
    """One database for the session; callers reset() it per test."""
    # Requested lazily from inside a running loop (only PostgreSQL runs need it): run in a worker thread.
    db = ThrowawayPostgres()
    with ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, db.start()).result()
        except RuntimeError as e:
            pytest.fail(str(e), pytrace=False)
        yield db
        pool.submit(asyncio.run, db.stop()).result()


@pytest.fixture
async def postgres() -> AsyncIterator[ThrowawayPostgres]:
    """A fresh database for one test, dropped after it even if bot processes still hold connections."""
    db = ThrowawayPostgres()
    try:
        await db.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield db
    finally:
        await db.stop()
