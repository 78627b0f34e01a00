"""The ledger's database engines: URL parsing, engine creation (SQLite in WAL mode, PostgreSQL with
server-side timeouts), and mapping driver errors to LedgerUnavailable and DatabaseUrlError.
"""

from __future__ import annotations

import asyncio
import errno
import random
import re
import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bot.errors import DatabaseUrlError, LedgerUnavailable

_URL_FORMS = "sqlite:////var/lib/funnelcake/ledger.db or postgresql://user:password@host:5432/database"


def _normalise_url(raw: str) -> tuple[URL, str]:
    """Pick the async driver for the URL's backend; return the URL and a password-free label for messages."""
    try:
        url = make_url(raw)
    except sa_exc.ArgumentError:
        raise DatabaseUrlError("it is not a database URL", f"write it as {_URL_FORMS}") from None
    except ValueError as e:
        # SQLAlchemy parses the port (what follows the host) with int(): its error quotes just that part.
        found = re.search(r"'(.*)'$", str(e))
        port = found.group(1) if found else "?"
        raise DatabaseUrlError(
            f"the port {port[:20]!r} is not a number",
            "give the database server's port after the host, as in postgresql://user@db.internal:5432/funnelcake",
        ) from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or url.query.get("mode") == "memory":
            raise DatabaseUrlError(
                "an in-memory SQLite ledger forgets every deploy and lock on restart",
                "give a file path, as in sqlite:////var/lib/funnelcake/ledger.db",
            )
        url = url.set(drivername="sqlite+aiosqlite")
        return url, f"SQLite file {database}"
    if backend in ("postgresql", "postgres"):
        if url.port is not None and not 0 < url.port < 65536:
            raise DatabaseUrlError(
                f"the port {url.port} is out of range", "give the database server's port (usually 5432)"
            )
        url = url.set(drivername="postgresql+asyncpg")
        return url, f"PostgreSQL {url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"
    raise DatabaseUrlError(
        f"the scheme {url.drivername.split('+')[0][:30]!r} is not a database the ledger supports",
        f"use sqlite or postgresql, as in {_URL_FORMS}",
    )


def _causes(e: BaseException) -> list[BaseException]:
    """The exception, the driver's error SQLAlchemy wraps, and what caused those, outermost first."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [e]
    while todo and len(seen) < 10:
        cur = todo.pop(0)
        if cur is None or any(cur is x for x in seen):
            continue
        seen.append(cur)
        todo.extend([getattr(cur, "orig", None), cur.__cause__, cur.__context__])
    return seen


def _disk_full(e: BaseException) -> bool:
    for c in _causes(e):
        if isinstance(c, OSError) and c.errno == errno.ENOSPC:
            return True
        text = str(c).lower()
        if "database or disk is full" in text or "no space left on device" in text:
            return True
        if getattr(c, "sqlstate", None) == "53100":  # PostgreSQL's disk_full
            return True
    return False


def _unavailable(e: BaseException, label: str) -> LedgerUnavailable:
    """What a person is told when the ledger cannot be used for now, from the driver's error."""
    causes = _causes(e)
    text = " ".join(str(c).lower() for c in causes)
    detail = _short_cause(e)
    if _disk_full(e):
        return LedgerUnavailable(
            f"The deploy ledger ({label}) cannot write: its disk is full",
            reason="disk full",
            hint="free space on the volume that holds it, or give it a bigger one; writes resume once there is room",
            detail=detail,
        )
    if any(isinstance(c, socket.gaierror) for c in causes):
        what, reason, hint = (
            "its host name is not found",
            "host name not found",
            "check the host in DATABASE_URL and the cluster's DNS",
        )
    elif any(isinstance(c, ConnectionRefusedError) for c in causes) or "connection refused" in text:
        what, reason, hint = (
            "the connection was refused",
            "connection refused",
            "check that the database is up and that DATABASE_URL's host and port point at it",
        )
    elif "database is locked" in text:
        what, reason, hint = (
            "another process holds its lock",
            "busy",
            "it is retried; if it lasts, look for a second bot writing the same SQLite file",
        )
    elif "unable to open database file" in text:
        what, reason, hint = (
            "its file cannot be opened",
            "file cannot be opened",
            "check that the file's directory exists and the bot may write there (a read-only volume?)",
        )
    elif any(isinstance(c, TimeoutError | sa_exc.TimeoutError) for c in causes):
        what, reason, hint = (
            "it did not answer in time",
            "timed out",
            "it may be overloaded or locked by another process; try again shortly",
        )
    else:
        what, reason, hint = (
            "the connection failed",
            "connection failed",
            "check that the database is up; the operation can be retried",
        )
    return LedgerUnavailable(
        f"The deploy ledger ({label}) is unreachable: {what}", reason=reason, hint=hint, detail=detail
    )


def _refused(e: sa_exc.DBAPIError, url: URL) -> DatabaseUrlError:
    """A database that answered and said no at open: the part of DATABASE_URL to fix."""
    state = next((getattr(c, "sqlstate", None) for c in _causes(e) if getattr(c, "sqlstate", None)), None)
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    if state == "3D000":
        return DatabaseUrlError(
            f"the database {url.database!r} does not exist on {where}",
            f"create it (createdb {url.database}) or fix the database name at the end of DATABASE_URL",
            reason="database missing",
        )
    if state in ("28000", "28P01"):
        return DatabaseUrlError(
            f"{where} refused the user {url.username or '(none given)'!r} (unknown user or wrong password)",
            "check the user and password in DATABASE_URL (or the secret it comes from)",
            reason="login refused",
        )
    if state == "42501":
        return DatabaseUrlError(
            f"the user {url.username or '(none given)'!r} may not create or change the ledger's tables in "
            f"{url.database!r}",
            "grant it CREATE and USAGE on the database's schema, or use the ledger's owner",
            reason="permission denied",
        )
    return DatabaseUrlError(
        f"the database at {where} refused to open the ledger ({_short_cause(e).split(':', 1)[0]}"
        f"{f', SQLSTATE {state}' if state else ''})",
        "check that DATABASE_URL's user may use the database, and read the server's log for the cause",
        reason="refused",
    )


def _short_cause(e: BaseException) -> str:
    # SQLAlchemy's str() carries the SQL and its parameters; the driver's first line is enough for a person.
    orig = getattr(e, "orig", None) or e
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    # SQLAlchemy's asyncpg adapter wraps the driver's precise class (QueryCanceledError …) in a generic one.
    name = type(orig.__cause__ or orig).__name__
    return f"{name}: {first[:200]}"


# SQLSTATE classes that mean "try again": connection lost (08), serialisation failure or deadlock (40),
# out of resources (53), cancelled by statement_timeout or a shutdown (57), lock_timeout (55P03).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57")


def _transient(e: sa_exc.DBAPIError) -> bool:
    if isinstance(e, sa_exc.OperationalError | sa_exc.InterfaceError) or e.connection_invalidated:
        return True
    state = getattr(e.orig, "sqlstate", None)
    return isinstance(state, str) and (state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state == "55P03")


async def _sqlite_engine(url: URL, query_timeout: float) -> AsyncEngine:
    path = Path(url.database or "")
    try:
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    except OSError as e:
        raise DatabaseUrlError(
            f"cannot create the ledger's directory {path.parent} "
            f"({'a file is in the way' if isinstance(e, FileExistsError) else e.strerror or type(e).__name__})",
            "give a path the bot may write to, such as a file on its volume: sqlite:////var/lib/funnelcake/ledger.db",
        ) from None
    if await asyncio.to_thread(path.is_dir):
        raise DatabaseUrlError(
            f"{path} is a directory, not a file",
            f"name a file in it, as in sqlite:///{path / 'ledger.db'}",
        )
    engine = create_async_engine(url, connect_args={"timeout": query_timeout})
    busy_ms = int(query_timeout * 800)  # SQLite gives up before the asyncio deadline cancels the query

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy (the driver would BEGIN lazily, DEFERRED), then make
        # waiting for another process's write lock a bounded wait instead of an instant "locked" error.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
        _enter_wal(dbapi_conn, cur, busy_ms / 1000)
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: a read-then-write transaction can never be refused
        # with SQLITE_BUSY_SNAPSHOT half-way, and conditional updates see the latest committed rows.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _enter_wal(dbapi_conn: Any, cur: Any, budget: float) -> None:
    """Switch a new file to write-ahead logging, waiting out other processes doing the same.

    The switch needs an exclusive lock, and two connections that each hold the shared lock and both
    want it deadlock: SQLite answers "database is locked" at once, without calling the busy handler.
    So processes opening a fresh ledger together each retry with a short back-off, within the same
    budget a busy lock gets; a file already in WAL mode (every open after the first) costs one read.
    """
    deadline = time.monotonic() + budget
    delay = 0.005
    while True:
        cur.execute("PRAGMA journal_mode")
        if str(cur.fetchone()[0]).lower() == "wal":
            return
        try:
            cur.execute("PRAGMA journal_mode = WAL")
        except dbapi_conn.dbapi.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() + delay > deadline:
                raise
        else:
            return
        # The hook runs inside SQLAlchemy's greenlet on the event loop: sleep there, not in the thread.
        dbapi_conn.run_async(lambda _raw, d=delay: asyncio.sleep(d))
        delay = min(delay * 2, 0.2) * random.uniform(0.5, 1.0) + 0.005  # noqa: S311 - jitter, not a secret


def _unopenable(path: Path) -> DatabaseUrlError:
    return DatabaseUrlError(
        f"the SQLite file {path} cannot be opened or created",
        f"check that the bot's user may read and write {path.parent} (a read-only volume?), or choose another path",
        reason="file cannot be opened",
    )


def _postgres_engine(url: URL, timeout: float) -> AsyncEngine:
    # The server gives up first, so a slow statement fails cleanly and its connection stays usable;
    # the client-side deadlines are the backstop for a server that does not answer at all.
    ms = str(int(timeout * 800))
    return create_async_engine(
        url,
        pool_pre_ping=True,
        pool_timeout=timeout,
        connect_args={
            "timeout": timeout,  # connecting
            "command_timeout": timeout,  # each statement, client side
            "server_settings": {
                "application_name": "funnelcake-deploy-bot",
                "statement_timeout": ms,
                "lock_timeout": ms,
                "idle_in_transaction_session_timeout": str(int(timeout * 3000)),
            },
        },
    )
