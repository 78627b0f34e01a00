"""Each environment stands alone: one env's broken overlay, hung registry or dead cluster leaves the others
working, and `status` answers within its deadline with a row per env saying what could not be read.

Driven through the real deploy service (bot.wiring.build_service) against the full sandbox.
"""

from __future__ import annotations

import asyncio
import re

from bot.drift import STATUS_DEADLINE, DriftReport, EnvReport
from bot.ledger.models import DeployKind, DeployState
from bot.service import DeployService
from handlers.blocks import status_blocks
from tests.test_crash_failover import frozen
from tests.test_failure_modes import ALICE, live_image, overlay_tag, parts, publish, set_relay_tag
from tests.testbed.gitrepos import overlay_path, push_from_second_clone
from tests.testbed.sandbox import Sandbox

SERVICES = ("funnelcake-api", "funnelcake-relay")


def drop_relay_images_entry(text: str) -> str:
    """A hand edit gone wrong: production's relay overlay loses its `images:` entry."""
    new, n = re.subn(r"(?ms)^images:.*\Z", "", text)
    assert n == 1, text
    return new


async def status(svc: DeployService) -> DriftReport:
    # A guard, not a measurement: a status that waits out git's or the registry's own timeouts fails here.
    async with asyncio.timeout(STATUS_DEADLINE + 10):
        return await svc.status()


def env_report(report: DriftReport, env: str) -> EnvReport:
    return next(e for e in report.envs if e.env == env)


async def assert_poc_works(sandbox: Sandbox, svc: DeployService) -> None:
    """plan, deploy, status and rollback of poc, as a user runs them."""
    git, _ = parts(sandbox)
    short, before = git.app.short("head"), git.app.short("api-paginate")
    await publish(sandbox, "poc", short)

    plan, result = await svc.plan(["poc"], short, ALICE)
    assert result.ok, [(r.step, r.message) for r in result.results]
    assert plan is not None
    assert plan.env_plans["poc"].previous == {"api": before, "relay": before}

    started = await svc.start(DeployKind.DEPLOY, ["poc"], short, ALICE)
    record = await svc.wait(started.record.id)
    assert record.state is DeployState.SUCCEEDED, record.message
    for name in SERVICES:
        assert live_image(sandbox, "poc", name) == f"{sandbox.registries.prefix('poc')}/{name}:{short}"

    poc = env_report(await status(svc), "poc")
    assert (poc.overlay_error, poc.registry_error, poc.error) == (None, None, None)
    assert all(r.overlay_tag == r.live_tag == short and r.healthy for r in poc.rows), poc.rows

    assert await svc.rollback_target("poc") == before
    rollback = await svc.start_rollback("poc", ALICE, allow_downgrade=True)  # back across a migration
    record = await svc.wait(rollback.record.id)
    assert record.state is DeployState.SUCCEEDED, record.message
    assert overlay_tag(sandbox, "poc", "api") == before


async def test_a_broken_production_overlay_leaves_poc_working(sandbox: Sandbox, svc: DeployService) -> None:
    git, _ = parts(sandbox)
    push_from_second_clone(
        git.gitops.url, overlay_path("relay", "production"), drop_relay_images_entry, "oops: lost images"
    )
    await assert_poc_works(sandbox, svc)

    report = await status(svc)
    production = env_report(report, "production")
    assert production.overlay_error is not None
    assert production.overlay_error.startswith("unreadable: ")
    assert "overlays/production/kustomization.yaml has no images entry named 'funnelcake-relay'" in (
        production.overlay_error
    )
    staging = env_report(report, "staging")
    assert staging.overlay_error is None
    assert all(r.overlay_tag == r.live_tag and r.healthy for r in staging.rows), staging.rows
    assert not [f for f in report.findings if f.env == "*"]  # no "GitOps repo unreadable" for everyone
    text = str(status_blocks(report))
    assert "🔴 overlays unreadable: " in text

    # production itself is refused, with the reason
    _, result = await svc.plan(["production"], git.app.short("head"), ALICE)
    assert result.failed is not None
    assert "has no images entry named 'funnelcake-relay'" in result.failed.message


async def test_a_hung_staging_registry_leaves_poc_working_and_status_answers(
    sandbox: Sandbox, svc: DeployService
) -> None:
    proc = sandbox.registries["staging"]._proc
    assert proc is not None
    with frozen(proc.pid):
        report = await status(svc)
        staging = env_report(report, "staging")
        assert staging.registry_error is not None
        assert staging.registry_error.startswith(
            f"unreachable: {sandbox.registries.prefix('staging')} did not answer within"
        )
        assert all(r.registry.startswith("unknown: unreachable") for r in staging.rows), staging.rows
        for env in ("poc", "production"):
            rows = env_report(report, env).rows
            assert all(r.registry == "ok" and r.healthy for r in rows), (env, rows)
        assert "🔴 registry unreachable: " in str(status_blocks(report))
        await assert_poc_works(sandbox, svc)


async def test_an_unreachable_staging_cluster_leaves_poc_working(
    sandbox: Sandbox, svc: DeployService
) -> None:
    _, clusters = parts(sandbox)
    await clusters["staging"].stop()
    report = await status(svc)
    staging = env_report(report, "staging")
    assert staging.error is not None and staging.error.startswith("unreachable"), staging.error
    assert all(r.overlay_tag for r in staging.rows)  # git still read
    await assert_poc_works(sandbox, svc)


async def test_status_checks_the_relay_against_its_own_tag(sandbox: Sandbox, svc: DeployService) -> None:
    git, _ = parts(sandbox)
    api = git.app.short("api-paginate")
    unpublished = git.app.short("head")  # in no registry
    push_from_second_clone(
        git.gitops.url, overlay_path("relay", "poc"), set_relay_tag(unpublished), "hand edit: relay only"
    )
    report = await status(svc)
    rows = {r.service: r for r in env_report(report, "poc").rows}
    assert (rows["api"].overlay_tag, rows["api"].registry) == (api, "ok")
    assert (rows["relay"].overlay_tag, rows["relay"].live_tag, rows["relay"].registry) == (
        unpublished,
        api,
        "missing",
    )
    texts = [f.text for f in report.findings if f.env == "poc"]
    assert f"funnelcake-relay:{unpublished} is missing from the poc registry: pods cannot pull it" in texts
    assert f"funnelcake-relay: git says {unpublished} but poc runs {api} (not synced?)" in texts
