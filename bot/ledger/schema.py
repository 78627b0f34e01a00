"""Ledger tables and the ordered, idempotent upgrade steps that bring any older database to the current one.

Each step is frozen once released: a schema change appends a new step, it never edits an old one, so a
database created by any earlier bot upgrades along the same path. The steps run inside one transaction
at `Ledger.open`; PostgreSQL serialises concurrent openers with a transaction-scoped advisory lock and
SQLite with BEGIN IMMEDIATE (the engine begins every transaction that way), so two bot processes that
start together run each step once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    TypeDecorator,
    func,
    inspect,
    select,
    text,
)

from bot.ledger.models import SchemaTooNew


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out; SQLite keeps naive UTC text, which sorts and compares correctly."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the ledger stores timezone-aware UTC only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json() -> JSON:
    return JSON(none_as_null=True)


# Key for pg_advisory_xact_lock while upgrading: any fixed 64-bit number private to this application.
SCHEMA_LOCK_KEY = 0x66C_DE9_10E  # "funnelcake deploy ledger"
# First half of the two-key advisory lock that serialises lock/lease changes of one env on PostgreSQL.
ENV_LOCK_NAMESPACE = 0x66C_DE9

# ---- the current schema, for queries (the upgrade steps below create it) ----

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(200), nullable=False),
    Column("applied_at", UTCDateTime, nullable=False),
)

deploys = Table(
    "deploys",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(16), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("envs", _json(), nullable=False),
    Column("ref", String(200), nullable=False),
    Column("sha", String(64)),
    Column("short", String(16)),
    Column("requester", String(64), nullable=False),
    Column("approver", String(64)),
    Column("state", String(24), nullable=False),
    Column("plan", _json()),
    Column("message", Text),
    Column("channel", String(32)),
    Column("thread_ts", String(32)),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("owner", String(128)),
    Column("last_step", String(64)),
    # the fencing token of the deploy's owner: grows with every take-over; every write checks it
    Column("epoch", Integer, nullable=False, server_default="0"),
    Column("cancel_requested_by", String(64)),
    Column("cancel_requested_at", UTCDateTime),
    # where the request came from: "slack", or "cli:<os user>@<host>" next to the Slack principal
    Column("origin", String(200)),
)

deploy_targets = Table(
    "deploy_targets",
    metadata,
    Column("deploy_id", String(16), ForeignKey("deploys.id", ondelete="CASCADE"), nullable=False),
    Column("env", String(32), nullable=False),
    Column("tag", String(128)),
    Column("previous_tag", String(128)),
    PrimaryKeyConstraint("deploy_id", "env"),
)

deploy_steps = Table(
    "deploy_steps",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("deploy_id", String(16), ForeignKey("deploys.id", ondelete="CASCADE"), nullable=False),
    Column("env", String(32)),
    Column("step", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime),
    Column("detail", _json()),
)

leases = Table(
    "leases",
    metadata,
    Column("env", String(32), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("deploy_id", String(16), nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
    # grows with every acquisition that is not a live renewal; rows outlive a release so it never goes back
    Column("epoch", Integer, nullable=False, server_default="0"),
    Column("released_at", UTCDateTime),
)

locks = Table(
    "locks",
    metadata,
    Column("env", String(32), primary_key=True),
    Column("user", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("since", UTCDateTime, nullable=False),
)

lock_events = Table(
    "lock_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("env", String(32), nullable=False),
    Column("action", String(8), nullable=False),
    Column("user", String(64), nullable=False),
    Column("reason", Text),
    Column("at", UTCDateTime, nullable=False),
)

approvals = Table(
    "approvals",
    metadata,
    Column(
        "deploy_id",
        String(16),
        ForeignKey("deploys.id", ondelete="CASCADE"),
        primary_key=True,
        nullable=False,
    ),
    Column("binding", String(128), nullable=False),
    Column("requester", String(64), nullable=False),
    Column("requested_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("state", String(16), nullable=False),
    Column("decided_by", String(64)),
    Column("decided_at", UTCDateTime),
    Column("reminded_at", UTCDateTime),  # when the approvers were reminded (once) before it expires
)

# One row per env of a multi-env request that needs approval, once one of that env's approvers approved.
env_approvals = Table(
    "env_approvals",
    metadata,
    Column("deploy_id", String(16), ForeignKey("deploys.id", ondelete="CASCADE"), nullable=False),
    Column("env", String(32), nullable=False),
    Column("approved_by", String(64), nullable=False),
    Column("approved_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("deploy_id", "env"),
)

incidents = Table(
    "incidents",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("env", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("key", String(256), nullable=False),  # what makes it the same incident from one look to the next
    Column("title", Text, nullable=False),
    Column("detail", _json()),
    Column("opened_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("closed_at", UTCDateTime),
    Column("channel", String(64)),
    Column("message_ts", String(32)),
    Index("ix_incidents_open", "closed_at", "env"),
)

# ---- upgrade steps: frozen table shapes, one function per version ----


def _columns(conn: Connection, table: str) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(table)}


def _v1(conn: Connection) -> None:
    """deploy history, steps, leases and manual locks"""
    md = MetaData()
    Table(
        "deploys",
        md,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("id", String(16), nullable=False, unique=True),
        Column("kind", String(16), nullable=False),
        Column("envs", _json(), nullable=False),
        Column("ref", String(200), nullable=False),
        Column("sha", String(64)),
        Column("short", String(16)),
        Column("requester", String(64), nullable=False),
        Column("approver", String(64)),
        Column("state", String(24), nullable=False),
        Column("plan", _json()),
        Column("message", Text),
        Column("channel", String(32)),
        Column("thread_ts", String(32)),
        Column("created_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        Column("finished_at", UTCDateTime),
        Index("ix_deploys_created", "created_at"),
        Index("ix_deploys_state", "state"),
    )
    Table(
        "deploy_steps",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("deploy_id", String(16), ForeignKey("deploys.id", ondelete="CASCADE"), nullable=False),
        Column("env", String(32)),
        Column("step", String(64), nullable=False),
        Column("state", String(16), nullable=False),
        Column("started_at", UTCDateTime, nullable=False),
        Column("finished_at", UTCDateTime),
        Column("detail", _json()),
        Index("ix_deploy_steps_deploy", "deploy_id"),
    )
    Table(
        "leases",
        md,
        Column("env", String(32), primary_key=True),
        Column("holder", String(128), nullable=False),
        Column("deploy_id", String(16), nullable=False),
        Column("acquired_at", UTCDateTime, nullable=False),
        Column("expires_at", UTCDateTime, nullable=False),
        Column("heartbeat_at", UTCDateTime, nullable=False),
    )
    Table(
        "locks",
        md,
        Column("env", String(32), primary_key=True),
        Column("user", String(64), nullable=False),
        Column("reason", Text, nullable=False),
        Column("since", UTCDateTime, nullable=False),
    )
    md.create_all(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    """approvals bound to a plan, and an audit trail of manual locks"""
    md = MetaData()
    Table("deploys", md, Column("id", String(16), primary_key=True))  # only as the foreign key's target
    approvals_v2 = Table(
        "approvals",
        md,
        Column(
            "deploy_id",
            String(16),
            ForeignKey("deploys.id", ondelete="CASCADE"),
            primary_key=True,
            nullable=False,
        ),
        Column("binding", String(128), nullable=False),
        Column("requester", String(64), nullable=False),
        Column("requested_at", UTCDateTime, nullable=False),
        Column("expires_at", UTCDateTime, nullable=False),
        Column("state", String(16), nullable=False),
        Column("decided_by", String(64)),
        Column("decided_at", UTCDateTime),
    )
    lock_events_v2 = Table(
        "lock_events",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("env", String(32), nullable=False),
        Column("action", String(8), nullable=False),
        Column("user", String(64), nullable=False),
        Column("reason", Text),
        Column("at", UTCDateTime, nullable=False),
        Index("ix_lock_events_env", "env", "at"),
    )
    md.create_all(conn, tables=[approvals_v2, lock_events_v2], checkfirst=True)


def _v3(conn: Connection) -> None:
    """crash recovery (owner, last step) and per-env deployed tags for rollback"""
    have = _columns(conn, "deploys")
    for name, ddl in (("owner", "VARCHAR(128)"), ("last_step", "VARCHAR(64)")):
        if name not in have:
            conn.execute(text(f"ALTER TABLE deploys ADD COLUMN {name} {ddl}"))
    md = MetaData()
    deploys_v3 = Table(
        "deploys",
        md,
        Column("id", String(16), primary_key=True),
        Column("kind", String(16)),
        Column("envs", _json()),
        Column("short", String(16)),
    )
    targets = Table(
        "deploy_targets",
        md,
        Column("deploy_id", String(16), ForeignKey("deploys.id", ondelete="CASCADE"), nullable=False),
        Column("env", String(32), nullable=False),
        Column("tag", String(128)),
        Column("previous_tag", String(128)),
        PrimaryKeyConstraint("deploy_id", "env"),
        Index("ix_deploy_targets_env", "env"),
    )
    md.create_all(conn, tables=[targets], checkfirst=True)
    # Older records only knew their env list and commit: a deploy or rollback put its short hash in
    # each of its envs. Backfill rows the step has not written yet, so re-running it changes nothing.
    done = {(r.deploy_id, r.env) for r in conn.execute(select(targets.c.deploy_id, targets.c.env))}
    values = [
        {"deploy_id": r.id, "env": env, "tag": r.short if r.kind in ("deploy", "rollback") else None}
        for r in conn.execute(select(deploys_v3))
        for env in r.envs or ()
        if (r.id, env) not in done
    ]
    if values:
        conn.execute(targets.insert(), values)


def _v4(conn: Connection) -> None:
    """fencing: epochs on deploys and leases, released leases kept, cancel requests"""
    for table, columns in (
        (
            "deploys",
            (
                ("epoch", "INTEGER NOT NULL DEFAULT 0"),
                ("cancel_requested_by", "VARCHAR(64)"),
                ("cancel_requested_at", "TIMESTAMP WITH TIME ZONE" if _pg(conn) else "DATETIME"),
            ),
        ),
        (
            "leases",
            (
                ("epoch", "INTEGER NOT NULL DEFAULT 0"),
                ("released_at", "TIMESTAMP WITH TIME ZONE" if _pg(conn) else "DATETIME"),
            ),
        ),
    ):
        have = _columns(conn, table)
        for name, ddl in columns:
            if name not in have:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}"))


def _v5(conn: Connection) -> None:
    """one authority: where each request came from, and per-env approvals of multi-env requests"""
    if "origin" not in _columns(conn, "deploys"):
        conn.execute(text("ALTER TABLE deploys ADD COLUMN origin VARCHAR(200)"))
    md = MetaData()
    Table("deploys", md, Column("id", String(16), primary_key=True))  # the key the new table refers to
    Table(
        "env_approvals",
        md,
        Column("deploy_id", String(16), ForeignKey("deploys.id", ondelete="CASCADE"), nullable=False),
        Column("env", String(32), nullable=False),
        Column("approved_by", String(64), nullable=False),
        Column("approved_at", UTCDateTime, nullable=False),
        PrimaryKeyConstraint("deploy_id", "env"),
    ).create(conn, checkfirst=True)


def _v6(conn: Connection) -> None:
    """incidents the watcher found outside any deploy, open and closed"""
    md = MetaData()
    Table(
        "incidents",
        md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("env", String(32), nullable=False),
        Column("kind", String(32), nullable=False),
        Column("key", String(256), nullable=False),
        Column("title", Text, nullable=False),
        Column("detail", _json()),
        Column("opened_at", UTCDateTime, nullable=False),
        Column("updated_at", UTCDateTime, nullable=False),
        Column("closed_at", UTCDateTime),
        Column("channel", String(64)),
        Column("message_ts", String(32)),
        Index("ix_incidents_open", "closed_at", "env"),
    ).create(conn, checkfirst=True)


def _v7(conn: Connection) -> None:
    """indexes for a ledger of many deploys: history pages, successes by finish time, due approvals, old steps"""
    for name, table, columns in (
        # history's order (newest first, seq breaking ties) read straight off one index, and its cursor
        ("ix_deploys_created_seq", "deploys", "created_at, seq"),
        # the env's last success (the rollback target) read newest-finished first, without sorting every
        # success; its leading state also serves the in-flight lookups
        ("ix_deploys_state_finished", "deploys", "state, finished_at, seq"),
        # history <env>: the env's deploys, probed from the deploys in history order
        ("ix_deploy_targets_env_deploy", "deploy_targets", "env, deploy_id"),
        # the recovery pass's sweep of pending approvals past their deadline
        ("ix_approvals_due", "approvals", "state, expires_at"),
        # retention: the oldest finished steps first
        ("ix_deploy_steps_finished", "deploy_steps", "finished_at"),
    ):
        conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({columns})"))
    # the two-column indexes above lead with the same columns: the single-column ones are redundant
    for name in ("ix_deploys_created", "ix_deploys_state", "ix_deploy_targets_env"):
        conn.execute(text(f"DROP INDEX IF EXISTS {name}"))


def _v8(conn: Connection) -> None:
    """approvals remember their one reminder, so of several replicas exactly one sends it"""
    if "reminded_at" not in _columns(conn, "approvals"):
        kind = "TIMESTAMP WITH TIME ZONE" if _pg(conn) else "DATETIME"
        conn.execute(text(f"ALTER TABLE approvals ADD COLUMN reminded_at {kind}"))


def _pg(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


Step = Callable[[Connection], None]
STEPS: tuple[Step, ...] = (_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8)
LATEST = len(STEPS)


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table("schema_version"):
        return 0
    return int(conn.execute(select(func.coalesce(func.max(schema_version.c.version), 0))).scalar_one())


def upgrade(conn: Connection, *, target: int | None = None, now: datetime | None = None) -> list[int]:
    """Bring the database to `target` (default: the latest); return the versions applied. Runs in the caller's transaction."""
    target = LATEST if target is None else target
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
    schema_version.create(conn, checkfirst=True)
    found = current_version(conn)
    if found > LATEST:
        raise SchemaTooNew(found, LATEST)
    applied: list[int] = []
    stamp = now or datetime.now(UTC)
    for version in range(found + 1, target + 1):
        step = STEPS[version - 1]
        step(conn)
        doc = (step.__doc__ or step.__name__).strip()
        conn.execute(schema_version.insert().values(version=version, description=doc, applied_at=stamp))
        applied.append(version)
    return applied
