"""Database migrations as a Kubernetes Job built from the env's config (never from user input), and their log."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bot.adapters.jobs import condition, run_job
from bot.adapters.kube import JSON, ClusterClient
from bot.errors import PermanentError
from bot.settings import MIGRATE_IMAGE, Environment, MigrationMode

_SHORT_SHA = re.compile(r"^[0-9a-f]{7,40}$")
_SECRET_KEYS_CLOUD = ("CLICKHOUSE_URL", "CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DATABASE")
_SECRET_KEYS_SELF_HOSTED = ("CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DATABASE")
BACKOFF_LIMIT = 3
TTL_SECONDS = 600
_MAX_FORCE_VERSION = 10**12  # golang-migrate versions are ints; timestamps as versions stay below this


def _secret_env(name: str, secret: str) -> JSON:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": name}}}


def migrate_args(action: str, version: int | None = None) -> list[str]:
    """The only two argument lists the Job may carry: ["up"] or ["force", "<version>"]."""
    if action == "up" and version is None:
        return ["up"]
    if action == "force" and isinstance(version, int) and not isinstance(version, bool):
        if not 0 <= version < _MAX_FORCE_VERSION:
            raise PermanentError(f"migration version {version} is out of range")
        return ["force", str(version)]
    raise PermanentError(f"unsupported migration action {action!r}: only 'up' and 'force <version>' exist")


def migration_job(env: Environment, short_sha: str, args: list[str]) -> JSON:
    """The migration Job for `env`: the ClickHouse connection comes from the env's config mode (F8)."""
    if not _SHORT_SHA.match(short_sha):
        raise PermanentError(f"{short_sha!r} is not a commit hash: the migrate image is tagged with one")
    if args != ["up"] and not (len(args) == 2 and args[0] == "force" and args[1].isdigit()):
        raise PermanentError(f"refusing migration args {args!r}: only ['up'] or ['force', '<version>']")
    m = env.migrations
    if m.mode is MigrationMode.CLOUD:
        container_env = [_secret_env(k, m.secret) for k in _SECRET_KEYS_CLOUD]
    else:
        # self-hosted: plain host/port, no TLS; CLICKHOUSE_URL would force port 9440 and time out
        container_env = [
            {"name": "CLICKHOUSE_HOST", "value": str(m.host)},
            {"name": "CLICKHOUSE_PORT", "value": str(m.port)},
            *(_secret_env(k, m.secret) for k in _SECRET_KEYS_SELF_HOSTED),
        ]
    labels = {
        "app.kubernetes.io/name": "funnelcake-db-migrate",
        "app.kubernetes.io/managed-by": "funnelcake-bot",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": m.job_name,
            "namespace": env.namespace,
            "labels": labels,
            "annotations": {"funnelcake.divine/commit": short_sha},
        },
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "ttlSecondsAfterFinished": TTL_SECONDS,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "migrate",
                            "image": env.image_ref(MIGRATE_IMAGE, short_sha),
                            "args": list(args),
                            "env": container_env,
                        }
                    ],
                },
            },
        },
    }


class MigrateOutcome(StrEnum):
    APPLIED = "applied"
    NO_CHANGE = "no-change"
    DIRTY = "dirty"
    FORCED = "forced"
    FAILED = "failed"


@dataclass(frozen=True)
class AppliedMigration:
    version: int
    direction: str
    name: str
    duration: str


@dataclass(frozen=True)
class MigrateLog:
    outcome: MigrateOutcome
    applied: tuple[AppliedMigration, ...] = ()
    dirty_version: int | None = None
    error: str | None = None
    hint: str | None = None


_APPLIED_RE = re.compile(r"^\s*(\d+)/([ud])\s+(\S+)\s+\(([^)]*)\)\s*$")
_DIRTY_RE = re.compile(r"Dirty database version (\d+)")
_ERROR_RE = re.compile(r"^\s*error:\s*(.+)$", re.I)


def parse_migrate_log(text: str, *, forced: bool = False) -> MigrateLog:
    """Read golang-migrate's output: applied lines, `no change`, errors, `Dirty database version X` (F7)."""
    applied: list[AppliedMigration] = []
    errors: list[str] = []
    no_change = False
    dirty: int | None = None
    for line in text.splitlines():
        if m := _APPLIED_RE.match(line):
            applied.append(AppliedMigration(int(m[1]), m[2], m[3], m[4]))
        elif line.strip() == "no change" or line.strip().endswith(" no change"):
            no_change = True
        if d := _DIRTY_RE.search(line):
            dirty = int(d[1])
        if e := _ERROR_RE.match(line):
            errors.append(e[1].strip())
    if dirty is not None:
        # a Job retries its pod: the first pod's log holds the real failure, the retries only say "Dirty"
        root = next((e for e in errors if "Dirty database version" not in e), None)
        return MigrateLog(
            MigrateOutcome.DIRTY,
            tuple(applied),
            dirty_version=dirty,
            error=f"Dirty database version {dirty}" + (f" (the migration failed: {root})" if root else ""),
            hint=(
                f"A migration failed half-way and left version {dirty} dirty. Check the database by hand, then "
                f"run the guarded `force {dirty}` and `up` again."
            ),
        )
    if errors:
        err = errors[-1]
        hint = None
        if "i/o timeout" in err and "9440" in err:
            hint = (
                "Port 9440 is ClickHouse Cloud's TLS port: the Job used CLICKHOUSE_URL (cloud mode) against a "
                "self-hosted ClickHouse. The env's migrations.mode must be self-hosted with host and port."
            )
        elif err.startswith("migration failed"):
            hint = (
                "The migration failed half-way: the database is now dirty at that version. Run `migrate` again "
                "to read the version, check the schema by hand, then use the guarded `force <version>`."
            )
        elif "i/o timeout" in err or "connection refused" in err:
            hint = "ClickHouse is unreachable from the Job: check the host/port or URL in the env's config and secret."
        return MigrateLog(MigrateOutcome.FAILED, tuple(applied), error=err, hint=hint)
    if applied:
        return MigrateLog(MigrateOutcome.APPLIED, tuple(applied))
    if no_change:
        return MigrateLog(MigrateOutcome.NO_CHANGE)
    if forced:
        return MigrateLog(MigrateOutcome.FORCED)
    return MigrateLog(MigrateOutcome.NO_CHANGE if not text.strip() else MigrateOutcome.APPLIED)


@dataclass(frozen=True)
class MigrationRun:
    env: str
    job: str
    args: tuple[str, ...]
    succeeded: bool
    log: str
    result: MigrateLog
    pod: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


class MigrationFailed(PermanentError):
    def __init__(self, message: str, *, run: MigrationRun, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.run = run


def check_force(env_name: str, version: int, dirty: int | None) -> None:
    """The guard on `force`: only the version a failed run reported as dirty may be forced."""
    if dirty is None:
        raise PermanentError(
            f"refusing to force a migration version in {env_name}: no run reported a dirty database",
            hint=f"Run `migrate {env_name} <commit>` first; force is offered only for the version it reports.",
        )
    if dirty != version:
        raise PermanentError(
            f"refusing to force version {version} in {env_name}: the database is dirty at version {dirty}",
            hint=f"Use `force {dirty}`.",
        )


class MigrationRunner:
    """Runs migration Jobs; one at a time per env in this process (the Job's fixed name guards the cluster)."""

    def __init__(self, *, job_timeout: float = 600.0) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._last: dict[str, MigrateLog] = {}
        self.job_timeout = job_timeout

    def _lock(self, env: str) -> asyncio.Lock:
        return self._locks.setdefault(env, asyncio.Lock())

    async def up(self, client: ClusterClient, env: Environment, short_sha: str) -> MigrationRun:
        return await self._run(client, env, short_sha, migrate_args("up"))

    async def force(
        self,
        client: ClusterClient,
        env: Environment,
        short_sha: str,
        version: int,
        *,
        reported_dirty: int | None = None,
    ) -> MigrationRun:
        """Force `version`, allowed only for the dirty version the last run of this env reported (F7).

        `reported_dirty` is that version as the audit trail recorded it (any bot process, any restart);
        without it, only a run made by this process counts.
        """
        last = self._last.get(env.name)
        dirty = reported_dirty
        if dirty is None and last is not None and last.outcome is MigrateOutcome.DIRTY:
            dirty = last.dirty_version
        check_force(env.name, version, dirty)
        return await self._run(client, env, short_sha, migrate_args("force", version))

    async def _run(
        self, client: ClusterClient, env: Environment, short_sha: str, args: list[str]
    ) -> MigrationRun:
        lock = self._lock(env.name)
        if lock.locked():
            raise PermanentError(
                f"a migration is already running in {env.name}", hint="Wait for it to finish, then retry."
            )
        async with lock:
            job = migration_job(env, short_sha, args)
            name = job["metadata"]["name"]
            done = await run_job(
                client,
                job,
                container="migrate",
                what="migration",
                limit=self.job_timeout,
                max_pods=BACKOFF_LIMIT + 1,
            )
            final, pod, log_text = done.job, done.pod, done.log
            forced = args[0] == "force"
            parsed = parse_migrate_log(log_text, forced=forced)
            succeeded = condition(final, "Complete") is not None
            if not succeeded and parsed.outcome in (MigrateOutcome.APPLIED, MigrateOutcome.NO_CHANGE):
                failed = condition(final, "Failed") or {}
                parsed = MigrateLog(
                    MigrateOutcome.FAILED,
                    parsed.applied,
                    error=str(failed.get("message") or failed.get("reason") or "the Job failed"),
                )
            self._last[env.name] = parsed
            run = MigrationRun(env.name, name, tuple(args), succeeded, log_text, parsed, pod)
            if not succeeded:
                raise MigrationFailed(
                    f"migration {' '.join(args)} in {env.name} failed: {parsed.error or 'see the Job log'}",
                    run=run,
                    hint=parsed.hint,
                )
            return run
