"""End to end through the deploy service on the full test bed: real registries, real git, simulated clusters."""

from __future__ import annotations

import asyncio

from bot.drift import build_report
from bot.ledger.models import DeployKind, DeployState
from bot.pipeline.engine import StepEvent
from bot.pipeline.vocab import SUMMARY_STEP, EventKind, StepName
from bot.service import DeployService
from bot.wiring import build_service
from tests.testbed.events import Events
from tests.testbed.gitrepos import remote_file, remote_head
from tests.testbed.sandbox import Sandbox

POC_OVERLAY = "k8s/applications/funnelcake-relay/overlays/poc/kustomization.yaml"


async def test_happy_path_to_poc(sandbox: Sandbox, service: tuple[DeployService, Events]) -> None:
    svc, events = service
    assert sandbox.git is not None
    assert sandbox.clusters is not None
    head = sandbox.git.app.commits["head"]
    short = head[:7]
    gitops_before = remote_head(sandbox.git.gitops.path)
    # CI built this commit into the production registry only; poc's registry must get its own copy
    for image in ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate"):
        await sandbox.registries.push("production", image, short, "multi", seed=f"{image}:{short}")

    started = await svc.start(DeployKind.DEPLOY, ["poc"], short, "U0ALICE")
    record = await svc.wait(started.record.id)

    assert record.state is DeployState.SUCCEEDED, record.message
    assert events.steps(record.id, EventKind.DONE) == [
        "resolve",
        "preflight",
        "images",
        "migrate",
        "gitops",
        "sync",
        "rollout",
        "verify",
        "deploy",  # the closing summary
    ]
    # the image was promoted into poc's own registry before git changed (F1)
    promoted = [e.message for e in events.events if e.step == "images" and e.kind.value == "progress"]
    assert f"poc/funnelcake-relay:{short} promoted from production" in promoted
    prefix = sandbox.registries.prefix("poc")
    assert f"newTag: {short}".encode() in remote_file(sandbox.git.gitops.path, POC_OVERLAY).replace(b'"', b"")
    assert remote_head(sandbox.git.gitops.path) != gitops_before
    # the poc cluster really runs it (F2, F3)
    dep = sandbox.clusters["poc"].store.get("deployments", "funnelcake", "funnelcake-relay")
    assert dep is not None
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"{prefix}/funnelcake-relay:{short}"
    assert dep["status"]["readyReplicas"] == dep["spec"]["replicas"]
    # staging and production were not touched
    staging = sandbox.clusters["staging"].store.get("deployments", "funnelcake", "funnelcake-relay")
    assert staging is not None
    assert not staging["spec"]["template"]["spec"]["containers"][0]["image"].endswith(short)
    # the audit trail has every step
    steps = await svc.deps.ledger.steps(record.id)
    assert [s.step for s in steps] == events.steps(record.id, EventKind.DONE)[:-1]


async def test_status_reports_drift_across_three_envs(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, _ = service
    report = await build_report(svc.deps)
    assert [e.env for e in report.envs] == ["production", "staging", "poc"]
    for env in report.envs:
        assert env.error is None
        for row in env.rows:
            assert row.overlay_tag == row.live_tag
            assert row.registry == "ok"
            assert row.healthy, row
    texts = [f.text for f in report.findings]
    # poc and staging run older commits than production (F11), with a catch-up action
    assert any(t.startswith("poc is ") and "behind production" in t for t in texts), texts
    assert any(f.action and f.action.startswith("catchup:staging:") for f in report.findings)
    # the staging site shows the live version
    assert report.envs[1].site is not None
    assert "shows" in report.envs[1].site


async def test_an_unanswered_approval_expires_and_the_thread_says_so(sandbox: Sandbox) -> None:
    assert sandbox.config is not None
    assert sandbox.git is not None
    timeouts = sandbox.config.timeouts.model_copy(update={"approval": 0.5})
    config = sandbox.config.model_copy(update={"timeouts": timeouts})
    short = sandbox.git.app.commits["head"][:7]
    for image in ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate"):
        await sandbox.registries.push("production", image, short, "multi", seed=f"{image}:{short}")
    events = Events()
    async with build_service(sandbox.settings(), config, reporters=lambda record: [events]) as svc:
        started = await svc.start(DeployKind.DEPLOY, ["production"], short, "U0ALICE")
        record = await svc.wait(started.record.id)
        assert record.state is DeployState.AWAITING_APPROVAL
        await asyncio.sleep(0.6)
        await svc.recover()  # the bot's periodic pass: nobody clicked, the approval lapses
        record = await svc.deps.ledger.get_deploy(record.id)
        assert record.state is DeployState.EXPIRED
        expired = [e.message for e in events.events if e.step == "approval" and e.kind.value == "failed"]
        assert expired == ["approval expired: nobody approved within 0.5 s; deploy again to ask anew"]
        assert events.events[-1].step == "deploy"
        assert events.events[-1].kind.value == "failed"


async def test_an_orphaned_deploy_in_a_locked_env_says_once_why_it_waits(sandbox: Sandbox) -> None:
    assert sandbox.config is not None
    events = Events()
    settings = sandbox.settings(lease_ttl=0.5)
    async with build_service(settings, sandbox.config, reporters=lambda record: [events]) as svc:
        ledger = svc.deps.ledger
        orphan = await ledger.create_deploy(
            kind=DeployKind.DEPLOY,
            envs=["poc"],
            ref="aaaf1b8",
            requester="U0ALICE",
            state=DeployState.RUNNING,
            owner="bot-dead",
        )
        await ledger.acquire_lease("poc", holder="bot-dead", deploy_id=orphan.id, ttl=0.1)
        await ledger.lock("poc", "U0CAROL", "database maintenance")
        await asyncio.sleep(0.6)  # the dead bot's lease lapsed
        for _ in range(2):
            assert await svc.recover() == [orphan.id]
            await svc.wait(orphan.id)
        waiting = [e.message for e in events.events if e.step == "recovery"]
        assert len(waiting) == 1  # said once, not on every pass
        assert "waiting to resume" in waiting[0]
        assert "database maintenance" in waiting[0]
        assert (await ledger.get_deploy(orphan.id)).state is DeployState.RUNNING
        await ledger.unlock("poc", "U0CAROL")
        assert await svc.recover() == [orphan.id]
        record = await svc.wait(orphan.id)
        # it had not pushed anything: interrupted, and the thread says nothing reached git
        assert record.state is DeployState.INTERRUPTED
        assert "nothing was pushed" in (record.message or "")


async def test_a_deploy_ending_as_the_bot_stops_still_tells_its_end(sandbox: Sandbox) -> None:
    """A rolling restart that lands while the final summary is being posted must not cut it off, nor call a
    finished deploy "handed over" for another bot to resume."""
    assert sandbox.config is not None
    assert sandbox.git is not None
    short = sandbox.git.app.commits["head"][:7]
    for image in ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate"):
        await sandbox.registries.push("production", image, short, "multi", seed=f"{image}:{short}")
    slow, after = Events(), Events()
    stopping: list[asyncio.Task[None]] = []

    async def stop_while_summarising(event: StepEvent) -> None:
        if event.step == SUMMARY_STEP and not stopping:
            stopping.append(asyncio.create_task(svc.shutdown(), name="test-shutdown"))
            await asyncio.sleep(0.3)  # a slow Slack: the stop arrives while this reply is on its way

    slow.hooks.append(stop_while_summarising)
    async with build_service(sandbox.settings(), sandbox.config, reporters=lambda r: [slow, after]) as svc:
        started = await svc.start(DeployKind.DEPLOY, ["poc"], short, "U0ALICE")
        record = await svc.wait(started.record.id)
        await stopping[0]
        assert record.state is DeployState.SUCCEEDED, record.message
        assert after.one(record.id, SUMMARY_STEP, EventKind.DONE).message == "deployed"
        assert not after.of(record.id, StepName.RECOVERY)
        assert (await svc.deps.ledger.get_deploy(record.id)).state is DeployState.SUCCEEDED


async def test_the_files_git_render_and_migrate_budgets_reach_the_adapters(sandbox: Sandbox) -> None:
    """A budget set in the environments file is the one the adapter runs with, not its built-in default."""
    assert sandbox.config is not None
    timeouts = sandbox.config.timeouts.model_copy(update={"git": 77.0, "render": 11.0, "migrate": 55.0})
    config = sandbox.config.model_copy(update={"timeouts": timeouts})
    async with build_service(sandbox.settings(), config) as svc:
        assert svc.deps.app_repo.fetch_timeout == 77.0
        assert svc.deps.gitops.network_timeout == 77.0
        assert svc.deps.gitops.render_timeout == 11.0
        assert svc.deps.migrations.job_timeout == 55.0
