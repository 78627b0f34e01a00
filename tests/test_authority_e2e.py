"""One authority, end to end: the requests an outside review found broken, through the running app and the CLI.

A CLI production deploy approved by a second person in Slack runs to the end; `deploy production,staging`
approved by a production approver runs; a rollback after a failed production deploy passes the bot's own
lock, from the thread's button and from the CLI; a stale Roll back button refuses once the env moved; a
typo'd ref leaves no record and no channel message; an approver removed from the group is refused at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bot.cli import main
from bot.ledger.models import DeployKind, DeployState
from bot.policy.locks import BOT_USER
from bot.settings import parse_config
from tests.test_slack_front import (
    CHANNEL,
    awaiting_approval,
    deployed_short,
    eventually,
    live_image,
    push_head,
    roots,
)
from tests.testbed.botrun import RunningBot
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import FakeSlack, UserGroup


@pytest.fixture
def cli_env(sandbox: Sandbox, slack_sandbox: FakeSlack) -> Iterator[Path]:
    """The CLI pointed at the sandbox and at Slack, its OS user mapped to Alice (a production deployer)."""
    data = yaml.safe_load(sandbox.config_path.read_text())
    data["operators"] = [{"os_user": pwd.getpwuid(os.getuid()).pw_name, "slack_user": "U0ALICE"}]
    for env in data["environments"]:
        if env["name"] == "production":
            env["channel"] = CHANNEL
    path = sandbox.root / "cli.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    s = sandbox.settings()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "FUNNELCAKE_CONFIG": str(path),
            "KUBECONFIG": str(s.kubeconfig),
            "DATABASE_URL": s.database_url,
            "WORK_DIR": str(sandbox.root / "cli-work"),
            "SLACK_BOT_TOKEN": slack_sandbox.bot_token,
            "SLACK_API_URL": slack_sandbox.api_url,
        }.items():
            mp.setenv(key, value)
        yield path


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_a_cli_production_deploy_is_approved_in_slack_and_runs_to_the_end(
    bot: RunningBot,
    slack_sandbox: FakeSlack,
    sandbox: Sandbox,
    cli_env: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    short = await push_head(sandbox)
    running = asyncio.create_task(cli("deploy", "production", short, "--yes", "--wait"))

    # the CLI posted the plan with Approve / Deny to production's channel
    def request() -> object:
        return next(
            (m for m in roots(slack_sandbox) if [b["action_id"] for b in m.buttons()] == ["approve", "deny"]),
            None,
        )

    root = await eventually(request, timeout=60, what="the CLI's approval request in Slack")
    assert "Requested by* <@U0ALICE>" in json.dumps(root.blocks, ensure_ascii=False)
    await bot.click(root.ts, "approve", user="U0CAROL")

    assert await asyncio.wait_for(running, 120) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "approved by <@U0CAROL>" in out, out
    assert live_image(sandbox, "production").endswith(f":{short}")
    assert bot.service is not None
    [record] = await bot.service.history("production", 1)
    assert record.state is DeployState.SUCCEEDED, record.message
    assert (record.requester, record.approver) == ("U0ALICE", "U0CAROL")
    assert record.origin is not None and record.origin.startswith("cli:")


async def test_a_multi_env_deploy_is_approved_by_a_production_approver(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox
) -> None:
    short = await push_head(sandbox)
    assert "Working on it" in await bot.command(f"deploy production,staging {short}", user="U0ALICE")
    root = await eventually(
        lambda: next(
            (m for m in roots(slack_sandbox) if m.buttons() and m.buttons()[0]["action_id"] == "approve"),
            None,
        ),
        timeout=60,
        what="approval buttons",
    )
    # staging needs no approval: it does not make Carol "not an approver of staging"
    await bot.click(root.ts, "approve", user="U0CAROL")
    await bot.settle()
    assert not [t for t in slack_sandbox.told("U0CAROL") if "Not allowed" in t], slack_sandbox.told("U0CAROL")
    assert bot.service is not None
    [record] = await bot.service.history("production", 1)
    assert record.state is DeployState.SUCCEEDED, record.message
    for env in ("production", "staging"):
        assert live_image(sandbox, env).endswith(f":{short}")


async def _failed_production_deploy(bot: RunningBot, slack: FakeSlack, sandbox: Sandbox) -> tuple[str, str]:
    """Deploy an arm64-inside image to production: the rollout fails and the bot locks production."""
    assert sandbox.clusters is not None
    short = await push_head(sandbox)
    previous = deployed_short(sandbox, "production")
    sandbox.clusters["production"].exec_format_tags.add(short)
    root = await awaiting_approval(bot, slack, short, "U0ALICE")
    await bot.click(root.ts, "approve", user="U0CAROL")
    await bot.settle()
    assert bot.service is not None
    [failed] = await bot.service.history("production", 1)
    assert failed.state is DeployState.FAILED, failed.message
    assert [lock.user for lock in await bot.service.deps.ledger.locks()] == [BOT_USER]
    return root.ts, previous


@pytest.mark.parametrize("way", ["button", "cli"])
async def test_rollback_passes_the_bots_own_failure_lock(
    way: str, bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox, cli_env: Path
) -> None:
    ts, previous = await _failed_production_deploy(bot, slack_sandbox, sandbox)
    if way == "button":
        await bot.click(ts, "rollback", user="U0ALICE")
        await bot.settle()
    else:
        assert await cli("rollback", "production") == 0
    assert bot.service is not None
    [rollback] = await bot.service.history("production", 1)
    assert rollback.kind is DeployKind.ROLLBACK
    assert rollback.state is DeployState.SUCCEEDED, rollback.message
    assert live_image(sandbox, "production").endswith(f":{previous}")
    assert await bot.service.deps.ledger.locks() == []  # a good rollback lifts the failure lock


async def test_a_stale_roll_back_button_refuses_after_the_env_moved(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox
) -> None:
    assert sandbox.clusters is not None
    assert bot.service is not None
    short = await push_head(sandbox)
    previous = deployed_short(sandbox, "staging")
    sandbox.clusters["staging"].exec_format_tags.add(short)
    await bot.command(f"deploy staging {short}", user="U0ALICE")
    await bot.settle()
    [failed] = await bot.service.history("staging", 1)
    assert failed.state is DeployState.FAILED
    # someone rolls staging back by command; the failed thread's Roll back button is now stale
    await bot.command("rollback staging", user="U0BOB")
    await bot.settle()
    assert live_image(sandbox, "staging").endswith(f":{previous}")
    records = len(await bot.service.history("staging", 50))

    await bot.click(str(failed.thread_ts), "rollback", user="U0DAVE")
    await bot.settle()

    told = slack_sandbox.told("U0DAVE")
    assert any(f"staging moved from `{short}` to `{previous}` since this message" in t for t in told), told
    assert len(await bot.service.history("staging", 50)) == records  # nothing started
    assert live_image(sandbox, "staging").endswith(f":{previous}")


async def test_a_typo_in_the_ref_leaves_no_record_and_posts_nothing(
    bot: RunningBot, slack_sandbox: FakeSlack
) -> None:
    assert bot.service is not None
    await bot.command("deploy staging mian", user="U0ALICE")
    await bot.settle()
    told = slack_sandbox.told("U0ALICE")
    assert any("mian" in t and "main" in t for t in told), told  # the closest ref is suggested
    assert await bot.service.history(None, 10) == []
    assert slack_sandbox.calls_to("chat.postMessage") == []
    assert await bot.service.deps.ledger.leases() == []


async def test_an_approver_removed_from_the_group_is_refused_at_the_click(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox
) -> None:
    short = await push_head(sandbox)
    root = await awaiting_approval(bot, slack_sandbox, short, "U0ALICE")
    # Carol's membership was just looked up (the cache is warm), then she leaves @funnelcake-approvers
    assert bot.front is not None
    assert "U0CAROL" in await bot.front.authority.groups.members("@funnelcake-approvers")
    slack_sandbox.usergroups["S0APPROVERS"] = UserGroup(
        "S0APPROVERS", "funnelcake-approvers", "funnelcake approvers", ("U0BOB",)
    )
    await bot.click(root.ts, "approve", user="U0CAROL")
    await bot.settle()
    assert any("may not approve production" in t for t in slack_sandbox.told("U0CAROL"))
    assert bot.service is not None
    [record] = await bot.service.history("production", 1)
    assert record.state is DeployState.AWAITING_APPROVAL


async def test_a_lock_refusal_is_private_with_a_live_mention_and_the_reason_escaped(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox
) -> None:
    assert bot.service is not None
    await bot.command("lock poc <!channel> load test & more", user="U0BOB")
    await bot.settle()
    posts = len(slack_sandbox.calls_to("chat.postMessage"))
    short = await push_head(sandbox)
    await bot.command(f"deploy poc {short}", user="U0ALICE")
    await bot.settle()
    [refusal] = [t for t in slack_sandbox.told("U0ALICE") if "locked" in t]
    assert refusal.startswith("❌ poc is locked by <@U0BOB> since "), refusal  # a mention Slack resolves
    assert "&lt;!channel&gt; load test &amp; more" in refusal  # what Bob typed stays text
    assert len(slack_sandbox.calls_to("chat.postMessage")) == posts  # nothing in the channel
    assert [r.kind for r in await bot.service.history("poc", 10)] == []  # no deploy record


async def test_the_cli_finds_an_operator_by_e_mail_through_slack(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox, cli_env: Path
) -> None:
    def operator_by(email: str) -> None:
        data = yaml.safe_load(cli_env.read_text())
        data["operators"] = [{"os_user": pwd.getpwuid(os.getuid()).pw_name, "email": email}]
        cli_env.write_text(yaml.safe_dump(data, sort_keys=False))

    await asyncio.to_thread(operator_by, "bob@funnelcake.test")
    assert await cli("lock", "poc", "by", "mail") == 0
    assert bot.service is not None
    [lock] = await bot.service.deps.ledger.locks()
    assert (lock.env, lock.user) == ("poc", "U0BOB")

    await asyncio.to_thread(operator_by, "nobody@funnelcake.test")
    assert await cli("unlock", "poc") == 3  # no such Slack user: not allowed, and the lock stays
    assert [lk.user for lk in await bot.service.deps.ledger.locks()] == ["U0BOB"]


async def test_each_env_that_needs_approval_needs_its_own_approver(
    sandbox: Sandbox, slack_sandbox: FakeSlack
) -> None:
    """staging also needs approval here, by Dave only: Carol's approval covers production, not staging."""
    assert sandbox.config is not None
    data = yaml.safe_load(await asyncio.to_thread(sandbox.config_path.read_text))
    for env in data["environments"]:
        if env["name"] == "staging":
            env.update({"approval_required": True, "approvers": ["U0DAVE"]})
    sandbox.config = parse_config(yaml.safe_dump(data))
    bot = RunningBot(sandbox, slack_sandbox)
    await bot.start()
    try:
        assert bot.service is not None
        short = await push_head(sandbox)
        await bot.command(f"deploy production,staging {short}", user="U0ALICE")
        await bot.settle()
        [root] = roots(slack_sandbox)
        await bot.click(root.ts, "approve", user="U0CAROL")
        await bot.settle()
        [record] = await bot.service.history("production", 1)
        assert record.state is DeployState.AWAITING_APPROVAL  # staging still waits for its approver
        shown = json.dumps(slack_sandbox.message(CHANNEL, root.ts).blocks, ensure_ascii=False)
        assert "still waiting for an approver of staging" in shown, shown
        await bot.click(root.ts, "approve", user="U0CAROL")  # a second click of hers adds nothing
        await bot.settle()
        assert (await bot.service.history("production", 1))[0].state is DeployState.AWAITING_APPROVAL

        await bot.click(root.ts, "approve", user="U0DAVE")
        await bot.settle()
        [record] = await bot.service.history("production", 1)
        assert record.state is DeployState.SUCCEEDED, record.message
        for env in ("production", "staging"):
            assert live_image(sandbox, env).endswith(f":{short}")
    finally:
        await bot.stop()


async def test_funnelcake_approve_runs_a_slack_request_from_the_cli_with_the_same_rules(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox, cli_env: Path
) -> None:
    def operator_is(user: str) -> None:
        data = yaml.safe_load(cli_env.read_text())
        data["operators"] = [{"os_user": pwd.getpwuid(os.getuid()).pw_name, "slack_user": user}]
        cli_env.write_text(yaml.safe_dump(data, sort_keys=False))

    short = await push_head(sandbox)
    root = await awaiting_approval(bot, slack_sandbox, short, "U0ALICE")
    assert bot.service is not None
    [record] = await bot.service.history("production", 1)

    await asyncio.to_thread(operator_is, "U0DAVE")  # no approver: the same refusal as the button's
    assert await cli("deny", record.id) == 3
    await asyncio.to_thread(operator_is, "U0CAROL")
    assert await cli("approve", record.id) == 0  # the deploy runs here, to the end

    [done] = await bot.service.history("production", 1)
    assert done.state is DeployState.SUCCEEDED, done.message
    assert done.approver == "U0CAROL"
    assert live_image(sandbox, "production").endswith(f":{short}")
    await bot.settle()
    shown = json.dumps(slack_sandbox.message(CHANNEL, root.ts).blocks, ensure_ascii=False)
    assert "Approved by <@U0CAROL>" in shown, shown  # the Slack thread followed the CLI's run


async def test_a_busy_env_is_told_privately_and_leaves_no_record(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox
) -> None:
    assert bot.service is not None
    ledger = bot.service.deps.ledger
    running = await ledger.create_deploy(
        kind=DeployKind.DEPLOY, envs=["poc"], ref="main", requester="U0BOB", state=DeployState.RUNNING
    )
    await ledger.acquire_lease("poc", holder="another-bot", deploy_id=running.id, ttl=60)
    short = await push_head(sandbox)
    await bot.command(f"deploy poc {short}", user="U0ALICE")
    await bot.settle()
    told = slack_sandbox.told("U0ALICE")
    assert any(t.startswith(f"❌ poc is busy: deploy {running.id}") and "<@U0BOB>" in t for t in told), told
    assert [r.id for r in await bot.service.history("poc", 10)] == [running.id]
    assert slack_sandbox.calls_to("chat.postMessage") == []
    [lease] = await ledger.leases()
    assert (lease.holder, lease.deploy_id) == ("another-bot", running.id)
