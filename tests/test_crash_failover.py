"""Crash safety and HA with real processes: SIGKILL mid-deploy then restart, failover between two replicas
sharing PostgreSQL, and two services racing for one env.

The sandbox is slowed (Timings) so a rollout lasts a few seconds and a kill lands inside it; LEASE_TTL and
RECOVERY_EVERY are cut to 4 s and 0.5 s so a takeover happens within seconds.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from bot.ledger import DeployKind, DeployState, Ledger, StepRecord, StepState
from bot.settings import Settings
from bot.wiring import build_service
from tests.testbed.botproc import BotProcess
from tests.testbed.gitrepos import remote_head
from tests.testbed.pg import ThrowawayPostgres, postgres  # noqa: F401 - postgres is a fixture
from tests.testbed.sandbox import Sandbox
from tests.testbed.scenario import (
    assert_clean_log,
    deploy_commits,
    frozen,
    launch,
    newest,
    push_head,
    running_images,
    step_names,
    wait_finished,
    wait_push,
    wait_step_running,
    wait_thread,
)
from tests.testbed.slack import FakeSlack

# Each test starts a sandbox and two or three bot processes and waits out lapsing leases: on a loaded machine
# that can pass the suite's 120 s default without anything being stuck; the inner waits report real hangs.
pytestmark = pytest.mark.timeout(300)


def taken_over_at(steps: list[StepRecord]) -> datetime:
    """When the new bot started its own sync: the second sync attempt of the deploy."""
    syncs = [s for s in steps if s.step == "sync"]
    assert len(syncs) == 2, [
        (s.step, s.state.value, s.started_at.isoformat(), (s.detail or {}).get("message")) for s in steps
    ]
    return syncs[1].started_at


async def test_sigkill_mid_deploy_then_restart(
    slow_sandbox: Sandbox, slack_sandbox: FakeSlack, bots: list[BotProcess]
) -> None:
    sandbox, slack = slow_sandbox, slack_sandbox
    assert sandbox.git is not None
    short = await push_head(sandbox)
    gitops_before = remote_head(sandbox.git.gitops.path)
    first = await launch(bots, sandbox, slack, "first")
    ledger = await Ledger.open(first.database_url)
    try:
        # ---- killed in rollout: the push is on the remote, so the next bot resumes from sync
        ack = await slack.send_slash(f"deploy poc {short}")
        assert "Working on it" in str(ack), ack
        record = await wait_step_running(ledger, "rollout", first)
        await first.kill()
        dead_owner = record.owner
        assert dead_owner
        stuck = await ledger.get_deploy(record.id)
        assert stuck.state is DeployState.RUNNING  # nothing cleaned up after a SIGKILL
        lease = await ledger.get_lease("poc")
        assert lease is not None
        assert lease.deploy_id == record.id
        assert lease.holder == dead_owner

        second = await launch(bots, sandbox, slack, "second")
        final = await wait_finished(ledger, record.id, second)
        assert final.state is DeployState.SUCCEEDED, (final.message, second.tail())
        assert final.owner not in (None, dead_owner)
        assert final.thread_ts
        text = await wait_thread(slack, final.thread_ts, "took over", "Done")
        assert f"took over from {dead_owner}" in text, text
        assert "stopped after sync" in text, text
        assert "resuming at sync" in text, text
        # the audit trail: everything up to the push once, then sync again and the rest by the new bot
        steps = await ledger.steps(record.id)
        assert taken_over_at(steps) >= lease.expires_at  # not while the dead bot's lease still held
        ok = step_names(steps, StepState.OK)
        assert ok == [
            "resolve",
            "preflight",
            "images",
            "migrate",
            "gitops",
            "sync",
            "sync",
            "rollout",
            "verify",
        ], ok
        # git was pushed exactly once; the poc cluster runs the new images; the lease is free again
        assert deploy_commits(sandbox, gitops_before) == [f"deploy(poc): funnelcake @ {short}"]
        prefix = sandbox.registries.prefix("poc")
        assert running_images(sandbox, "poc") == {
            s: f"{prefix}/funnelcake-{s}:{short}" for s in ("api", "relay")
        }
        assert await ledger.get_lease("poc") is None

        # ---- killed in preflight: nothing reached git, so the next bot calls it interrupted
        gitops_mid = remote_head(sandbox.git.gitops.path)
        registry = sandbox.registries["poc"]
        assert registry is not None
        with frozen(registry.pid):  # the poc registry hangs: preflight's image check waits on it
            await slack.send_slash(f"deploy poc {short}")
            doomed = await wait_step_running(ledger, "preflight", second, after=record.id)
            await second.kill()
        third = await launch(bots, sandbox, slack, "third")
        ended = await wait_finished(ledger, doomed.id, third)
        assert ended.state is DeployState.INTERRUPTED, (ended.message, third.tail())
        assert ended.message is not None
        assert "nothing was pushed" in ended.message
        assert "interrupted after resolve" in ended.message
        assert remote_head(sandbox.git.gitops.path) == gitops_mid
        assert ended.thread_ts
        await wait_thread(slack, ended.thread_ts, "nothing was pushed")
        assert await ledger.get_lease("poc") is None
        assert_clean_log(third)
        assert await third.stop() == 0, third.tail()
    finally:
        await ledger.close()


async def test_failover_between_two_replicas_on_postgres(
    slow_sandbox: Sandbox,
    slack_sandbox: FakeSlack,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
    bots: list[BotProcess],
) -> None:
    sandbox, slack = slow_sandbox, slack_sandbox
    assert sandbox.git is not None
    short = await push_head(sandbox)
    gitops_before = remote_head(sandbox.git.gitops.path)
    # Slack hands each envelope to one connection (here: the newest), so `active` gets the command.
    standby = await launch(bots, sandbox, slack, "standby", database_url=postgres.url)
    active = await launch(bots, sandbox, slack, "active", database_url=postgres.url)
    assert slack.socket_connections == 2
    ledger = await Ledger.open(postgres.url)
    try:
        await slack.send_slash(f"deploy poc {short}")
        record = await wait_step_running(ledger, "rollout", active)
        # the standby's recovery pass ran many times by now and left a heart-beating deploy alone
        assert (await ledger.get_deploy(record.id)).owner == record.owner
        await active.kill()
        lease = await ledger.get_lease("poc")
        assert lease is not None
        assert lease.holder == record.owner
        final = await wait_finished(ledger, record.id, standby)
        assert final.state is DeployState.SUCCEEDED, (final.message, standby.tail())
        assert final.owner not in (None, record.owner)
        assert final.thread_ts
        text = await wait_thread(slack, final.thread_ts, f"took over from {record.owner}", "Done")
        assert "stopped after sync" in text, text
        steps = await ledger.steps(record.id)
        assert taken_over_at(steps) >= lease.expires_at  # the standby waited for the lease to lapse
        assert step_names(steps, StepState.OK).count("gitops") == 1
        assert step_names(steps, StepState.OK)[-3:] == ["sync", "rollout", "verify"]
        assert deploy_commits(sandbox, gitops_before) == [f"deploy(poc): funnelcake @ {short}"]
        prefix = sandbox.registries.prefix("poc")
        assert running_images(sandbox, "poc") == {
            s: f"{prefix}/funnelcake-{s}:{short}" for s in ("api", "relay")
        }
        assert_clean_log(standby)

        # ---- killed the moment its push lands, before the ledger hears of it: the overlays tell the truth
        older = sandbox.git.app.short("relay-tune")  # production runs it: its images are there to promote
        mid = remote_head(sandbox.git.gitops.path)
        # the standby is the only connection left; poc runs head, so going back to it is a confirmed downgrade
        await slack.send_slash(f"deploy poc {older} --allow-downgrade")
        await wait_push(sandbox, mid, standby)
        await standby.kill()
        doomed = await newest(ledger)
        assert doomed is not None
        assert doomed.id != record.id
        recorded = step_names(await ledger.steps(doomed.id), StepState.OK)
        successor = await launch(bots, sandbox, slack, "successor", database_url=postgres.url)
        resumed = await wait_finished(ledger, doomed.id, successor)
        assert resumed.state is DeployState.SUCCEEDED, (resumed.message, successor.tail())
        assert deploy_commits(sandbox, mid) == [f"deploy(poc): funnelcake @ {older}"]
        ok = step_names(await ledger.steps(doomed.id), StepState.OK)
        assert ok.count("gitops") == recorded.count("gitops"), (recorded, ok)  # never pushed again
        assert ok[-3:] == ["sync", "rollout", "verify"]
        assert resumed.thread_ts
        where = "gitops" if "gitops" in recorded else "migrate"
        await wait_thread(slack, resumed.thread_ts, f"stopped after {where}", "resuming at sync", "Done")
        assert running_images(sandbox, "poc") == {
            s: f"{prefix}/funnelcake-{s}:{older}" for s in ("api", "relay")
        }
        assert_clean_log(successor)
        assert await successor.stop() == 0, successor.tail()
    finally:
        await ledger.close()


async def test_two_services_race_for_one_env_on_postgres(
    sandbox: Sandbox,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
) -> None:
    assert sandbox.config is not None
    assert sandbox.git is not None
    short = await push_head(sandbox)
    gitops_before = remote_head(sandbox.git.gitops.path)

    def settings(name: str) -> Settings:
        # 3 s, not less: on a loaded machine a 0.25 s heartbeat can slip past a 1 s lease, and the
        # bot then rightly cancels the deploy it no longer holds
        return sandbox.settings(database_url=postgres.url, work_dir=sandbox.root / name, lease_ttl=3.0)

    async with (
        build_service(settings("one"), sandbox.config) as one,
        build_service(settings("two"), sandbox.config) as two,
    ):
        # ---- two deploys of the same env at the same moment: the lease lets exactly one run
        a, b = await asyncio.gather(
            one.start(DeployKind.DEPLOY, ["poc"], short, "U0ALICE"),
            two.start(DeployKind.DEPLOY, ["poc"], short, "U0BOB"),
        )
        ra, rb = await one.wait(a.record.id), await two.wait(b.record.id)
        results = {ra.state, rb.state}
        assert results == {DeployState.SUCCEEDED, DeployState.FAILED}, (ra.message, rb.message)
        won, lost = (ra, rb) if ra.state is DeployState.SUCCEEDED else (rb, ra)
        assert lost.message is not None
        # who, why and since
        assert lost.message.startswith(f"poc is busy: deploy {won.id}"), lost.message
        assert f"deploy of {short}" in lost.message
        assert f"requested by <@{won.requester}>" in lost.message
        assert "has held it since" in lost.message
        lost_steps = await one.deps.ledger.steps(lost.id)
        assert "resolve" not in [s.step for s in lost_steps]  # refused before doing anything
        assert deploy_commits(sandbox, gitops_before) == [f"deploy(poc): funnelcake @ {short}"]

        # ---- a deploy whose bot died, found by both at once: exactly one takes it over
        ledger = one.deps.ledger
        orphan = await ledger.create_deploy(
            kind=DeployKind.DEPLOY,
            envs=["poc"],
            ref=short,
            requester="U0CAROL",
            state=DeployState.RUNNING,
            owner="bot-dead",
        )
        await ledger.acquire_lease("poc", holder="bot-dead", deploy_id=orphan.id, ttl=0.2)
        await ledger.record_step(orphan.id, "resolve", state=StepState.OK)
        await asyncio.sleep(3.2)  # the lease lapsed and the record is older than a lease
        lapsed = await ledger.get_lease("poc")
        assert lapsed is not None
        assert lapsed.expires_at < datetime.now(UTC)
        await asyncio.gather(one.recover(), two.recover())
        for svc in (one, two):
            await svc.wait(orphan.id)
        ended = await ledger.get_deploy(orphan.id)
        assert ended.state is DeployState.INTERRUPTED, ended.message
        steps = [s.step for s in await ledger.steps(orphan.id)]
        assert steps.count("recovery") == 1, steps
        assert "lock" not in steps, steps  # the loser backs off quietly
        assert await ledger.get_lease("poc") is None
