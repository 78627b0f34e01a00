"""The Slack front end to end: signed requests to /slack/events, asserting on what the local Slack recorded."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import urlencode

from bot.ledger.models import DeployState
from tests.testbed.botrun import RunningBot
from tests.testbed.slack import SIGNING_SECRET, FakeSlack, Message, signed_headers

CHANNEL = "C0DEPLOYS"


def root_messages(slack: FakeSlack) -> list[Message]:
    return [m for m in slack.messages(CHANNEL) if not m.is_reply and m.ephemeral_to is None]


async def push_head(bot: RunningBot) -> str:
    assert bot.sandbox.git is not None
    short = bot.sandbox.git.app.commits["head"][:7]
    for image in ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate"):
        await bot.sandbox.registries.push("production", image, short, "multi", seed=f"{image}:{short}")
    return short


async def test_deploy_poc_posts_a_root_message_and_thread(bot: RunningBot, slack_sandbox: FakeSlack) -> None:
    short = await push_head(bot)
    ack = await bot.command(f"deploy poc {short}")
    assert "Working on it" in ack
    await bot.settle()

    roots = root_messages(slack_sandbox)
    assert len(roots) == 1
    root = roots[0]
    assert f"Deploy funnelcake @ {short} → poc" in root.text
    assert root.edited  # the state line advanced with chat.update
    replies = slack_sandbox.thread(CHANNEL, root.ts)
    text = "\n".join(r.text for r in replies)
    for step in ("resolve", "preflight", "images", "gitops", "sync", "rollout", "verify"):
        assert f"*{step}*" in text, text
    assert replies[-1].text.startswith("<@U0ALICE> 🎉 *Done*"), replies[-1].text  # the requester is told
    assert not replies[-1].broadcast  # a success stays in the thread
    assert "Argo CD revision" in replies[-1].text
    assert f"Deploy funnelcake @ {short} → poc: 🎉 Done" in slack_sandbox.message(CHANNEL, root.ts).text
    assert bot.service is not None
    [record] = await bot.service.history("poc", 1)
    assert record.state is DeployState.SUCCEEDED
    assert record.thread_ts == root.ts


async def test_production_deploy_needs_another_approver(bot: RunningBot, slack_sandbox: FakeSlack) -> None:
    short = await push_head(bot)
    await bot.command(f"deploy production {short}", user="U0ALICE")
    await bot.settle()
    [root] = root_messages(slack_sandbox)
    labels = [b["action_id"] for b in root.buttons()]
    assert labels == ["approve", "deny"]
    assert "Commits included" in str(root.blocks)
    assert "Migrations that will run" in str(root.blocks)
    # the expiry is a Slack date token: each reader sees it in their own time zone, UTC as the fallback
    assert re.search(
        r"expires <!date\^\d+\^\{date_short_pretty\} at \{time\}\|\d{4}-\d\d-\d\d \d\d:\d\d UTC>",
        str(root.blocks),
    )
    assert root.text.endswith(": waiting for approval")
    # the approvers are pinged in a new message (an edit notifies nobody), the requester is not asked
    ask = [r for r in slack_sandbox.thread(CHANNEL, root.ts) if r.text.startswith("🙋")]
    assert len(ask) == 1, [r.text for r in slack_sandbox.thread(CHANNEL, root.ts)]
    assert ask[0].text.startswith("🙋 <!subteam^S0APPROVERS>: <@U0ALICE>'s request for production waits"), (
        ask[0].text
    )

    # Alice is not an approver: refused
    await bot.click(root.ts, "approve", user="U0ALICE")
    await bot.settle()
    ephemerals = slack_sandbox.told("U0ALICE")
    assert any("may not approve" in t for t in ephemerals), ephemerals
    # a non-approver is refused
    await bot.click(root.ts, "approve", user="U0DAVE")
    await bot.settle()
    dave = slack_sandbox.told("U0DAVE")
    assert any("may not approve" in t for t in dave), dave

    # Bob double-clicks Approve: two payloads; the first decision counts, the second is told so
    await asyncio.gather(
        bot.click(root.ts, "approve", user="U0BOB"), bot.click(root.ts, "approve", user="U0BOB")
    )
    await bot.settle()
    root = slack_sandbox.message(CHANNEL, root.ts)
    assert "approve" not in [b["action_id"] for b in root.buttons()]
    assert "Approved by <@U0BOB>" in str(root.blocks)
    bob = slack_sandbox.told("U0BOB")
    assert [t for t in bob if "already approved" in t], bob
    assert bot.service is not None
    [record] = await bot.service.history("production", 1)
    assert record.state is DeployState.SUCCEEDED, record.message
    assert record.approver == "U0BOB"


async def test_an_approver_cannot_approve_their_own_deploy(bot: RunningBot, slack_sandbox: FakeSlack) -> None:
    short = await push_head(bot)
    await bot.command(f"deploy production {short}", user="U0BOB")  # Bob is an approver
    await bot.settle()
    [root] = root_messages(slack_sandbox)
    await bot.click(root.ts, "approve", user="U0BOB")
    await bot.settle()
    bob = slack_sandbox.told("U0BOB")
    assert any("cannot approve your own deploy" in t for t in bob), bob
    root = slack_sandbox.message(CHANNEL, root.ts)
    assert [b["action_id"] for b in root.buttons()] == ["approve", "deny"]  # still waiting for someone else
    assert bot.service is not None
    [record] = await bot.service.history("production", 1)
    assert record.state is DeployState.AWAITING_APPROVAL
    assert record.approver is None


async def test_forged_and_stale_requests_are_rejected(bot: RunningBot, slack_sandbox: FakeSlack) -> None:
    body = urlencode(slack_sandbox.slash_payload("status")).encode()
    status, _ = await bot.post(body, signed_headers(body, SIGNING_SECRET, forge=True))
    assert status == 401
    status, _ = await bot.post(body, signed_headers(body, SIGNING_SECRET, age=6 * 60))
    assert status == 401
    assert slack_sandbox.calls_to("chat.postMessage") == []
