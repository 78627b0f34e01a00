"""Migrations: the Job built from config (F8), the golang-migrate log parser (F7), and runs on a simulated cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.adapters.migrations import (
    MigrateOutcome,
    build_job,
    migrate_args,
    parse_migrate_log,
)
from bot.errors import PermanentError
from bot.settings import load_config

CONFIG = load_config(Path(__file__).resolve().parent.parent / "config" / "funnelcake.yaml")


def env_vars(job: dict) -> dict[str, dict]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def test_cloud_job_takes_url_and_credentials_from_the_secret() -> None:
    env = CONFIG.env("production")
    job = build_job(env, "e7e79eb", ["up"])
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
    ev = env_vars(build_job(env, "e7e79eb", ["force", "3"]))
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
        build_job(CONFIG.env("poc"), "e7e79eb", args)


@pytest.mark.parametrize("sha", ["E7E79EB", "e7e79e", "e7e79eb:latest", "../x"])
def test_job_refuses_a_tag_that_is_not_a_commit(sha: str) -> None:
    with pytest.raises(PermanentError):
        build_job(CONFIG.env("poc"), sha, ["up"])


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
