"""The ledger: deploy history, env leases and manual locks, and approvals, on SQLite or PostgreSQL.

Every method runs in one short transaction under a deadline and returns plain dataclasses. Cross-process
safety comes from the database, not from this process: conditional writes (INSERT … ON CONFLICT DO UPDATE
… WHERE, UPDATE … WHERE state = …) decide races, SQLite begins every transaction IMMEDIATE so a writer
never upgrades a stale read, and PostgreSQL serialises lock/lease changes of one env with an advisory lock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import re
import secrets
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack

from sqlalchemy import (
    ColumnElement,
    Row,
    and_,
    case,
    delete,
    event,
    exists,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bot.errors import DatabaseUrlError, LedgerUnavailable
from bot.ledger import schema as s
from bot.ledger.models import (
    IN_FLIGHT_STATES,
    AlreadyDecided,
    Approval,
    ApprovalExpired,
    ApprovalState,
    ApprovalVoid,
    Control,
    Decision,
    DecisionKind,
    DeployRecord,
    DeployState,
    Fence,
    Fenced,
    IncidentRecord,
    Lease,
    LedgerError,
    LockEvent,
    LockHeld,
    ManualLock,
    NoApproval,
    StateConflict,
    StepRecord,
    StepState,
    UnknownDeploy,
    when,
    who,
)
from bot.models import DeployKind

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Short ids people read aloud and type: no 0/o, 1/l/i.
_ID_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"
_ID_LEN = 6
_ID_ATTEMPTS = 5


def new_deploy_id() -> str:
    return "d-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LEN))


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DeployUpdate(TypedDict, total=False):
    """Fields `update_deploy` may change; anything else about a deploy is fixed at creation."""

    state: DeployState
    approver: str | None
    plan: dict[str, Any] | None
    message: str | None
    channel: str | None
    thread_ts: str | None
    owner: str | None
    last_step: str | None
    sha: str | None
    short: str | None
    finished_at: datetime | None
    tags: Mapping[str, str]  # env -> tag this deploy put in the overlays
    previous_tags: Mapping[str, str]  # env -> tag the overlays held before


_COLUMN_FIELDS = (
    "state",
    "approver",
    "plan",
    "message",
    "channel",
    "thread_ts",
    "owner",
    "last_step",
    "sha",
    "short",
    "finished_at",
)


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


def _as_kind(value: str) -> DeployKind:
    return DeployKind(str(value))


def _decision(state: str) -> DecisionKind:
    return "approve" if state == ApprovalState.APPROVED else "deny"


class Ledger:
    """Async access to the ledger database. Build with `await Ledger.open(url)`; `close()` when done."""

    def __init__(self, engine: AsyncEngine, *, label: str, clock: Clock, timeout: float) -> None:
        self._engine = engine
        self._label = label
        self._clock = clock
        self._timeout = timeout
        self._pg = engine.dialect.name == "postgresql"

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
        return (postgresql.insert if self._pg else sqlite.insert)(table)

    # ---- deploy records ----

    async def create_deploy(
        self,
        *,
        kind: DeployKind | str,
        envs: Sequence[str],
        ref: str,
        requester: str,
        sha: str | None = None,
        short: str | None = None,
        state: DeployState = DeployState.PLANNED,
        plan: dict[str, Any] | None = None,
        channel: str | None = None,
        thread_ts: str | None = None,
        owner: str | None = None,
        tags: Mapping[str, str] | None = None,
        previous_tags: Mapping[str, str] | None = None,
        deploy_id: str | None = None,
        origin: str | None = None,
    ) -> DeployRecord:
        """Record a new deploy. A deploy or rollback with a short hash puts that tag in each env unless `tags` says otherwise."""
        kind = _as_kind(kind)
        env_list = list(dict.fromkeys(envs))
        if not env_list or len(env_list) != len(envs):
            raise ValueError(f"envs must be a non-empty list without repeats, got {list(envs)!r}")
        if tags is None:
            tags = {e: short for e in env_list} if kind.changes_tags and short else {}
        previous_tags = previous_tags or {}
        _check_envs(env_list, tags, previous_tags)
        for attempt in range(_ID_ATTEMPTS):
            new_id = deploy_id or new_deploy_id()
            now = self._now()
            try:
                async with self._tx() as conn:
                    await conn.execute(
                        s.deploys.insert().values(
                            id=new_id,
                            kind=kind.value,
                            envs=env_list,
                            ref=ref,
                            sha=sha,
                            short=short,
                            requester=requester,
                            state=DeployState(state).value,
                            plan=plan,
                            channel=channel,
                            thread_ts=thread_ts,
                            created_at=now,
                            updated_at=now,
                            finished_at=now if DeployState(state).terminal else None,
                            owner=owner,
                            origin=origin,
                        )
                    )
                    await conn.execute(
                        s.deploy_targets.insert(),
                        [
                            {
                                "deploy_id": new_id,
                                "env": e,
                                "tag": tags.get(e),
                                "previous_tag": previous_tags.get(e),
                            }
                            for e in env_list
                        ],
                    )
                    return await self._get(conn, new_id)
            except sa_exc.IntegrityError:
                if deploy_id is not None or attempt == _ID_ATTEMPTS - 1:
                    raise
                log.info("deploy id collision, drawing another", extra={"deploy_id": new_id})
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def update_deploy(
        self,
        deploy_id: str,
        *,
        expect_state: DeployState | Collection[DeployState] | None = None,
        fence: Fence | None = None,
        **fields: Unpack[DeployUpdate],
    ) -> DeployRecord:
        """Change a deploy; with `expect_state`, only if it is still in that state (else StateConflict);
        with `fence`, only if that owner still holds it at that epoch (else Fenced: a stale bot's write
        changes nothing).

        Moving to a terminal state stamps finished_at unless given.
        """
        values: dict[str, Any] = {k: fields[k] for k in _COLUMN_FIELDS if k in fields}  # type: ignore[literal-required]
        unknown = set(fields) - set(_COLUMN_FIELDS) - {"tags", "previous_tags"}
        if unknown:
            raise TypeError(f"update_deploy cannot change {sorted(unknown)}")
        now = self._now()
        if "state" in values:
            state = DeployState(values["state"])
            values["state"] = state.value
            if state.terminal and "finished_at" not in values:
                values["finished_at"] = now
        values["updated_at"] = now
        expected: tuple[DeployState, ...] = ()
        if expect_state is not None:
            expected = (
                (DeployState(expect_state),)
                if isinstance(expect_state, str)
                else tuple(DeployState(x) for x in expect_state)
            )
        async with self._tx() as conn:
            stmt = update(s.deploys).where(s.deploys.c.id == deploy_id).values(**values)
            if expected:
                stmt = stmt.where(s.deploys.c.state.in_([x.value for x in expected]))
            if fence is not None:
                stmt = stmt.where(_owned_by(fence))
            result = await conn.execute(stmt)
            if result.rowcount == 0:
                current = await self._get(conn, deploy_id)  # raises UnknownDeploy
                _check_fence(current, fence)
                raise StateConflict(deploy_id, current.state, expected)
            tags = fields.get("tags") or {}
            previous = fields.get("previous_tags") or {}
            if tags or previous:
                envs = (
                    await conn.execute(
                        select(s.deploy_targets.c.env).where(s.deploy_targets.c.deploy_id == deploy_id)
                    )
                ).scalars()
                _check_envs(list(envs), tags, previous)
                for env, tag in tags.items():
                    await conn.execute(
                        update(s.deploy_targets)
                        .where(s.deploy_targets.c.deploy_id == deploy_id, s.deploy_targets.c.env == env)
                        .values(tag=tag)
                    )
                for env, tag in previous.items():
                    await conn.execute(
                        update(s.deploy_targets)
                        .where(s.deploy_targets.c.deploy_id == deploy_id, s.deploy_targets.c.env == env)
                        .values(previous_tag=tag)
                    )
            return await self._get(conn, deploy_id)

    async def get_deploy(self, deploy_id: str) -> DeployRecord:
        async with self._tx() as conn:
            return await self._get(conn, deploy_id)

    async def history(
        self, env: str | None = None, limit: int = 20, *, before: str | None = None
    ) -> list[DeployRecord]:
        """Newest first; with `env`, only records that touched that env; with `before` (a deploy id), only
        records older than that one: the next page after a page that ended with it."""
        records, _ = await self.history_page(env, limit, before=before)
        return records

    async def history_page(
        self, env: str | None = None, limit: int = 20, *, before: str | None = None
    ) -> tuple[list[DeployRecord], bool]:
        """`history`, and whether older records than the page's last exist (ask again with `before` = its id).

        UnknownDeploy if `before` names no deploy."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        d = s.deploys.c
        where: list[ColumnElement[bool]] = []
        if env is not None:
            where.append(_touches(env))
        async with self._tx() as conn:
            if before is not None:
                mark = (await conn.execute(select(d.created_at, d.seq).where(d.id == before))).one_or_none()
                if mark is None:
                    raise UnknownDeploy(before)
                where.append(
                    or_(
                        d.created_at < mark.created_at,
                        and_(d.created_at == mark.created_at, d.seq < mark.seq),
                    )
                )
            found = await self._load(conn, where, limit=limit + 1)
            return found[:limit], len(found) > limit

    async def in_flight(self, owner: str | None = None) -> list[DeployRecord]:
        """Deploys running or awaiting approval (optionally of one bot instance): what a restart must resolve."""
        where: list[ColumnElement[bool]] = [s.deploys.c.state.in_([x.value for x in IN_FLIGHT_STATES])]
        if owner is not None:
            where.append(s.deploys.c.owner == owner)
        async with self._tx() as conn:
            return await self._load(conn, where, limit=None)

    async def last_succeeded(self, env: str) -> DeployRecord | None:
        """The deploy or rollback that put the env's current tag in place, by finish time."""
        async with self._tx() as conn:
            found = await self._succeeded(conn, env, limit=1)
            return found[0] if found else None

    async def previous_succeeded(self, env: str) -> DeployRecord | None:
        """The newest success before the current one that left a different tag: where a rollback goes."""
        async with self._tx() as conn:
            current = await self._succeeded(conn, env, limit=1)
            if not current:
                return None
            cur = current[0]
            cur_seq = (
                await conn.execute(select(s.deploys.c.seq).where(s.deploys.c.id == cur.id))
            ).scalar_one()
            assert cur.finished_at is not None  # noqa: S101 - _succeeded only returns finished records
            older = or_(
                s.deploys.c.finished_at < cur.finished_at,
                and_(s.deploys.c.finished_at == cur.finished_at, s.deploys.c.seq < cur_seq),
            )
            found = await self._succeeded(conn, env, limit=1, extra=[older], tag_not=cur.tags[env])
            return found[0] if found else None

    async def _succeeded(
        self,
        conn: AsyncConnection,
        env: str,
        *,
        limit: int,
        extra: Sequence[ColumnElement[bool]] = (),
        tag_not: str | None = None,
    ) -> list[DeployRecord]:
        t = s.deploy_targets.c
        tagged = [t.deploy_id == s.deploys.c.id, t.env == env, t.tag.is_not(None)]
        if tag_not is not None:
            tagged.append(t.tag != tag_not)
        # EXISTS rather than a join: the planner walks the deploys newest-finished first down their index
        # and stops at the first that put a tag in the env, instead of sorting every deploy of the env.
        q = (
            select(s.deploys.c.id)
            .where(
                exists().where(*tagged),
                s.deploys.c.state == DeployState.SUCCEEDED.value,
                s.deploys.c.kind.in_([k.value for k in DeployKind if k.changes_tags]),
                s.deploys.c.finished_at.is_not(None),
                *extra,
            )
            .order_by(s.deploys.c.finished_at.desc(), s.deploys.c.seq.desc())
            .limit(limit)
        )
        ids = list((await conn.execute(q)).scalars())
        return [await self._get(conn, i) for i in ids]

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

    async def control(self, deploy_id: str) -> Control:
        c = s.deploys.c
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    select(c.state, c.owner, c.epoch, c.cancel_requested_by).where(c.id == deploy_id)
                )
            ).one_or_none()
            if row is None:
                raise UnknownDeploy(deploy_id)
            return Control(DeployState(row.state), row.owner, row.epoch, row.cancel_requested_by)

    async def claim_deploy(self, deploy_id: str, *, owner: str, expect: Fence | None) -> DeployRecord:
        """Become the deploy's owner at the next epoch, if it is still owned as `expect` says (None: by
        nobody, e.g. after a hand-over). Every take-over goes through here; the loser gets Fenced."""
        c = s.deploys.c
        now = self._now()
        async with self._tx() as conn:
            held = c.owner.is_(None) if expect is None else _owned_by(expect)
            result = await conn.execute(
                update(s.deploys)
                .where(c.id == deploy_id, held, c.state.in_([x.value for x in IN_FLIGHT_STATES]))
                .values(owner=owner, epoch=c.epoch + 1, updated_at=now)
            )
            current = await self._get(conn, deploy_id)
            if result.rowcount == 0:
                if current.state.terminal:
                    raise StateConflict(deploy_id, current.state, IN_FLIGHT_STATES)
                raise Fenced(deploy_id, _fence_why(current.owner, current.epoch))
            # Steps the previous owner left running will never be finished by it (it is fenced out now):
            # close them, saying why, so the deploy's story has no step running forever.
            previous = expect.owner if expect is not None else "its previous bot"
            st = s.deploy_steps.c
            await conn.execute(
                update(s.deploy_steps)
                .where(st.deploy_id == deploy_id, st.state == StepState.RUNNING.value)
                .values(
                    state=StepState.ERRORED.value,
                    finished_at=now,
                    detail={
                        "message": f"stopped: {previous} stopped running the deploy; {owner} took it over"
                    },
                )
            )
            return current

    async def hand_over(self, deploy_id: str, fence: Fence) -> DeployRecord:
        """Give a running deploy up for any bot to resume at once (a graceful stop): no owner, same epoch."""
        return await self.update_deploy(deploy_id, fence=fence, expect_state=IN_FLIGHT_STATES, owner=None)

    async def request_cancel(self, deploy_id: str, user: str) -> DeployRecord:
        """Ask the deploy's owner, whichever bot it is, to stop it; the first request is kept.

        A deploy awaiting approval has no run to stop: it is cancelled here and now."""
        c = s.deploys.c
        now = self._now()
        async with self._tx() as conn:
            current = await self._get(conn, deploy_id)
            if current.state.terminal:
                raise StateConflict(deploy_id, current.state, IN_FLIGHT_STATES)
            values: dict[str, Any] = {"updated_at": now}
            if current.cancel_requested_by is None:
                values.update(cancel_requested_by=user, cancel_requested_at=now)
            if current.state is DeployState.AWAITING_APPROVAL:
                values.update(
                    state=DeployState.CANCELLED.value,
                    message=f"cancelled by {who(user)} while it waited for approval; nothing was pushed",
                    finished_at=now,
                )
            await conn.execute(
                update(s.deploys)
                .where(c.id == deploy_id, c.state.in_([x.value for x in IN_FLIGHT_STATES]))
                .values(**values)
            )
            return await self._get(conn, deploy_id)

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

    async def heartbeat(self, env: str, holder: str, ttl: float, *, epoch: int | None = None) -> bool:
        """Extend a live lease; False means it lapsed, was released or was taken over, so the holder must stop."""
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        now = self._now()
        c = s.leases.c
        async with self._tx() as conn:
            stmt = update(s.leases).where(
                c.env == env, c.holder == holder, c.expires_at > now, c.released_at.is_(None)
            )
            if epoch is not None:
                stmt = stmt.where(c.epoch == epoch)
            result = await conn.execute(
                stmt.values(expires_at=now + timedelta(seconds=ttl), heartbeat_at=now)
            )
            return bool(result.rowcount)

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

    async def expired_leases(self) -> list[Lease]:
        """Leases whose holder stopped heart-beating: their deploys are candidates for takeover."""
        now = self._now()
        c = s.leases.c
        async with self._tx() as conn:
            q = select(s.leases).where(c.expires_at <= now, c.released_at.is_(None)).order_by(c.env)
            return [_lease(r) for r in (await conn.execute(q)).all()]

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

    async def lock_events(self, env: str | None = None, limit: int = 20) -> list[LockEvent]:
        c = s.lock_events.c
        q = select(s.lock_events).order_by(c.at.desc(), c.id.desc()).limit(limit)
        if env is not None:
            q = q.where(c.env == env)
        async with self._tx() as conn:
            return [
                LockEvent(env=r.env, action=r.action, user=r.user, reason=r.reason, at=r.at)
                for r in (await conn.execute(q)).all()
            ]

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


# ---- engines ----


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


# ---- row -> dataclass ----


def _check_envs(envs: Sequence[str], *maps: Mapping[str, str]) -> None:
    for m in maps:
        stray = set(m) - set(envs)
        if stray:
            raise ValueError(
                f"tags for env(s) {sorted(stray)} that the deploy does not target ({list(envs)})"
            )


def _owned_by(fence: Fence) -> ColumnElement[bool]:
    return and_(s.deploys.c.owner == fence.owner, s.deploys.c.epoch == fence.epoch)


def _fence_why(owner: str | None, epoch: int) -> str:
    if owner is None:
        return "it was handed over and awaits a bot to resume it"
    return f"{owner} took it over (epoch {epoch})"


def _check_fence(current: DeployRecord, fence: Fence | None) -> None:
    if fence is not None and (current.owner, current.epoch) != (fence.owner, fence.epoch):
        raise Fenced(current.id, _fence_why(current.owner, current.epoch))


def _lease_why(mine: Lease, row: Row[Any] | None, now: datetime) -> str:
    if row is None or row.released_at is not None:
        return f"its lease on {mine.env} was released"
    if (row.holder, row.deploy_id, row.epoch) != (mine.holder, mine.deploy_id, mine.epoch):
        return f"{row.holder} holds {mine.env} now (epoch {row.epoch}, deploy {row.deploy_id})"
    return f"its lease on {mine.env} lapsed at {when(row.expires_at, now)}"


def _touches(env: str) -> ColumnElement[bool]:
    return exists().where(s.deploy_targets.c.deploy_id == s.deploys.c.id, s.deploy_targets.c.env == env)


def _deploy(r: Row[Any], targets: Sequence[Row[Any]]) -> DeployRecord:
    return DeployRecord(
        id=r.id,
        kind=_as_kind(r.kind),
        envs=tuple(r.envs),
        ref=r.ref,
        sha=r.sha,
        short=r.short,
        requester=r.requester,
        approver=r.approver,
        state=DeployState(r.state),
        plan=r.plan,
        message=r.message,
        channel=r.channel,
        thread_ts=r.thread_ts,
        created_at=r.created_at,
        updated_at=r.updated_at,
        finished_at=r.finished_at,
        owner=r.owner,
        last_step=r.last_step,
        tags={t.env: t.tag for t in targets if t.tag is not None},
        previous_tags={t.env: t.previous_tag for t in targets if t.previous_tag is not None},
        epoch=r.epoch,
        cancel_requested_by=r.cancel_requested_by,
        cancel_requested_at=r.cancel_requested_at,
        origin=r.origin,
    )


def _step(r: Row[Any]) -> StepRecord:
    return StepRecord(
        id=r.id,
        deploy_id=r.deploy_id,
        env=r.env,
        step=r.step,
        state=StepState(r.state),
        started_at=r.started_at,
        finished_at=r.finished_at,
        detail=r.detail,
    )


def _lease(r: Row[Any], *, taken_over_from: str | None = None) -> Lease:
    return Lease(
        env=r.env,
        holder=r.holder,
        deploy_id=r.deploy_id,
        acquired_at=r.acquired_at,
        expires_at=r.expires_at,
        heartbeat_at=r.heartbeat_at,
        taken_over_from=taken_over_from,
        epoch=r.epoch,
    )


def _incident(r: Row[Any]) -> IncidentRecord:
    return IncidentRecord(
        id=r.id,
        env=r.env,
        kind=r.kind,
        key=r.key,
        title=r.title,
        detail=dict(r.detail or {}),
        opened_at=r.opened_at,
        updated_at=r.updated_at,
        closed_at=r.closed_at,
        channel=r.channel,
        message_ts=r.message_ts,
    )


def _lock(r: Row[Any]) -> ManualLock:
    return ManualLock(env=r.env, user=r.user, reason=r.reason, since=r.since)


def _approval(r: Row[Any], *, state: ApprovalState | None = None) -> Approval:
    return Approval(
        deploy_id=r.deploy_id,
        binding=r.binding,
        requester=r.requester,
        requested_at=r.requested_at,
        expires_at=r.expires_at,
        state=state or ApprovalState(r.state),
        decided_by=r.decided_by,
        decided_at=r.decided_at,
    )
