"""Migrations: the Job built from config (F8), the golang-migrate log parser (F7), and runs on a simulated cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.adapters.kube import KubeClients
from bot.adapters.migrations import (
    MigrateOutcome,
    MigrationFailed,
    MigrationRunner,
    migrate_args,
    migration_job,
    parse_migrate_log,
)
from bot.errors import PermanentError
from bot.settings import Environment, MigrationMode, Migrations, load_config
from tests.testbed.gitrepos import AppRemote
from tests.testbed.kube.cluster import SimCluster
from tests.testbed.registry import Registries

CONFIG = load_config(Path(__file__).resolve().parent.parent / "config" / "funnelcake.yaml")


def env_vars(job: dict) -> dict[str, dict]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def test_cloud_job_takes_url_and_credentials_from_the_secret() -> None:
    env = CONFIG.env("production")
    job = migration_job(env, "e7e79eb", ["up"])
    ev = env_vars(job)
    assert set(ev) == {"CLICKHOUSE_URL", "CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DATABASE"}
    for name, e in ev.items():
        assert e["valueFrom"]["secretKeyRef"] == {"name": "funnelcake-clickhouse-credentials", "key": name}
    assert job["metadata"]["name"] == "funnelcake-db-migrate"
    assert job["metadata"]["namespace"] == "funnelcake"
    assert job["spec"]["backoffLimit"] == 3
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["up"]
    assert container["image"] == f"{env.registry}/funnelcake-migrate:e7e79eb"


@pytest.mark.parametrize("name", ["staging", "poc"])
def test_self_hosted_job_never_gets_clickhouse_url(name: str) -> None:
    env = CONFIG.env(name)
    ev = env_vars(migration_job(env, "e7e79eb", ["force", "3"]))
    assert "CLICKHOUSE_URL" not in ev
    assert ev["CLICKHOUSE_HOST"] == {
        "name": "CLICKHOUSE_HOST",
        "value": "funnelcake-funnelcake-clickhouse.funnelcake.svc.cluster.local",
    }
    assert ev["CLICKHOUSE_PORT"] == {"name": "CLICKHOUSE_PORT", "value": "9000"}
    for k in ("CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DATABASE"):
        assert ev[k]["valueFrom"]["secretKeyRef"]["name"] == "funnelcake-clickhouse-credentials"


@pytest.mark.parametrize(
    "args", [["up", "--extra"], ["force", "3; rm -rf /"], ["down"], ["force"], ["drop", "-f"], []]
)
def test_job_refuses_anything_but_up_and_force_version(args: list[str]) -> None:
    with pytest.raises(PermanentError):
        migration_job(CONFIG.env("poc"), "e7e79eb", args)


@pytest.mark.parametrize("sha", ["E7E79EB", "e7e79e", "e7e79eb:latest", "../x"])
def test_job_refuses_a_tag_that_is_not_a_commit(sha: str) -> None:
    with pytest.raises(PermanentError):
        migration_job(CONFIG.env("poc"), sha, ["up"])


def test_migrate_args() -> None:
    assert migrate_args("up") == ["up"]
    assert migrate_args("force", 4) == ["force", "4"]
    for bad in [("force", None), ("force", -1), ("up", 3), ("down", None), ("force", True)]:
        with pytest.raises(PermanentError):
            migrate_args(*bad)  # type: ignore[arg-type]


def test_parse_applied_lines() -> None:
    log = "1/u create_events (23.4ms)\n2/u add_tags (5.1ms)\n3/u add_index (12.3ms)\n"
    res = parse_migrate_log(log)
    assert res.outcome is MigrateOutcome.APPLIED
    assert [(m.version, m.direction, m.name, m.duration) for m in res.applied] == [
        (1, "u", "create_events", "23.4ms"),
        (2, "u", "add_tags", "5.1ms"),
        (3, "u", "add_index", "12.3ms"),
    ]


def test_parse_no_change() -> None:
    assert parse_migrate_log("no change\n").outcome is MigrateOutcome.NO_CHANGE


def test_parse_dirty_carries_the_version() -> None:
    res = parse_migrate_log("error: Dirty database version 3. Fix and force version.\n")
    assert res.outcome is MigrateOutcome.DIRTY
    assert res.dirty_version == 3
    assert "force 3" in (res.hint or "")


def test_parse_failure_half_way_then_dirty() -> None:
    log = "3/u add_index (12.3ms)\nerror: migration failed in line 0: ALTER TABLE x (details: boom)\n"
    res = parse_migrate_log(log)
    assert res.outcome is MigrateOutcome.FAILED
    assert res.applied[0].version == 3
    assert res.error is not None
    assert res.error.startswith("migration failed in line 0")


def test_parse_io_timeout_on_9440_explains_the_wrong_mode_trap() -> None:
    res = parse_migrate_log("error: dial tcp 10.0.0.12:9440: i/o timeout\n")
    assert res.outcome is MigrateOutcome.FAILED
    assert "9440" in (res.hint or "")
    assert "self-hosted" in (res.hint or "")


def test_parse_forced_run() -> None:
    assert parse_migrate_log("", forced=True).outcome is MigrateOutcome.FORCED


# ------------------------------------------------------------------------------ on the simulated cluster


async def push_migrate(registries: Registries, tag: str) -> None:
    await registries.push("staging", "funnelcake-migrate", tag, "amd64", seed=f"migrate-{tag}")


async def test_up_applies_pending_migrations_with_the_self_hosted_env(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    app_remote: AppRemote,
) -> None:
    tag = app_remote.short("add-index")  # deployed in staging: its migrate image is in the registry
    sim_cluster.clickhouse.version = 2
    runner = MigrationRunner(job_timeout=20)
    run = await runner.up(staging_clients[staging.kube_context], staging, tag)
    assert run.succeeded
    assert run.result.outcome is MigrateOutcome.APPLIED
    assert [(m.version, m.name) for m in run.result.applied] == [(3, "add_index")]
    assert sim_cluster.clickhouse.version == 3
    job = sim_cluster.store.get("jobs", "funnelcake", "funnelcake-db-migrate")
    env_names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "CLICKHOUSE_URL" not in env_names
    assert {"CLICKHOUSE_HOST", "CLICKHOUSE_PORT"} <= env_names
    # nothing pending now; the previous Job is replaced, not conflicting
    again = await runner.up(staging_clients[staging.kube_context], staging, tag)
    assert again.result.outcome is MigrateOutcome.NO_CHANGE
    assert "testbed-fake-password" not in run.log + again.log


async def test_dirty_database_is_detected_and_only_the_reported_version_can_be_forced(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    app_remote: AppRemote,
    registries: Registries,
) -> None:
    client = staging_clients[staging.kube_context]
    broken = app_remote.short("broken")  # adds 000004, which fails half-way
    await push_migrate(registries, broken)
    runner = MigrationRunner(job_timeout=20)
    with pytest.raises(PermanentError, match="no run reported a dirty database"):
        await runner.force(client, staging, broken, 4)
    with pytest.raises(MigrationFailed) as err:
        await runner.up(client, staging, broken)
    res = err.value.run.result
    assert res.outcome is MigrateOutcome.DIRTY  # the Job's retries read the dirty flag the first pod left
    assert res.dirty_version == 4
    assert "migration failed in line 0" in (res.error or "")
    assert "force 4" in (err.value.hint or "")
    assert sim_cluster.clickhouse.dirty
    with pytest.raises(PermanentError, match="dirty at version 4"):
        await runner.force(client, staging, broken, 3)
    forced = await runner.force(client, staging, broken, 4)
    assert forced.succeeded
    assert forced.args == ("force", "4")
    assert forced.result.outcome is MigrateOutcome.FORCED
    assert not sim_cluster.clickhouse.dirty
    after = await runner.up(client, staging, broken)
    assert after.result.outcome is MigrateOutcome.NO_CHANGE
    # forcing again without a new dirty report is refused
    with pytest.raises(PermanentError):
        await runner.force(client, staging, broken, 4)


async def test_cloud_mode_on_a_self_hosted_cluster_times_out_on_9440_and_says_why(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    app_remote: AppRemote,
) -> None:
    wrong = staging.model_copy(update={"migrations": Migrations(mode=MigrationMode.CLOUD)})
    with pytest.raises(MigrationFailed) as err:
        await MigrationRunner(job_timeout=20).up(
            staging_clients[staging.kube_context], wrong, app_remote.short("add-index")
        )
    assert err.value.run.result.outcome is MigrateOutcome.FAILED
    assert "i/o timeout" in (err.value.run.result.error or "")
    assert "9440" in (err.value.hint or "")
    job = sim_cluster.store.get("jobs", "funnelcake", "funnelcake-db-migrate")
    assert job["spec"]["backoffLimit"] == 3
    assert job["status"]["failed"] == 4  # backoffLimit respected: 1 + 3 retries


async def test_one_migration_at_a_time(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    app_remote: AppRemote,
) -> None:
    client = staging_clients[staging.kube_context]
    runner = MigrationRunner(job_timeout=20)
    first = asyncio.create_task(runner.up(client, staging, app_remote.short("add-index")))
    await asyncio.sleep(0)
    with pytest.raises(PermanentError, match="already running in staging"):
        await runner.up(client, staging, app_remote.short("add-index"))
    await first
    # another bot (or a person) has a Job running (its pod stuck pulling): its fixed name guards the cluster
    sim_cluster.store.delete("jobs", "funnelcake", "funnelcake-db-migrate")
    sim_cluster.store.create("jobs", migration_job(staging, "0000000", ["up"]))
    with pytest.raises(PermanentError, match="still running"):
        await MigrationRunner(job_timeout=5).up(client, staging, app_remote.short("add-index"))
    assert sim_cluster.store.get("jobs", "funnelcake", "funnelcake-db-migrate") is not None  # left alone
