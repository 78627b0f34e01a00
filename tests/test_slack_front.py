"""The Slack front through its real entry points (signed HTTP and Socket Mode), judged by what Slack recorded.

Issue 8's remaining cases: ack-only answers (help, usage errors), the status report within Slack's
limits and its one-click catch-up, approvals that expire or are denied, a channel at Slack's real
posting rate with two deploys at once, and a failed rollout whose diagnosis offers a working rollback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler

from bot.ledger.models import DeployKind, DeployState
from tests.testbed.botrun import RunningBot
from tests.testbed.gitrepos import remote_head
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import ACK_DEADLINE, MAX_BLOCKS, MAX_SECTION_TEXT, FakeSlack, Message

CHANNEL = "C0DEPLOYS"
IMAGES = ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate")
ENVS = ("production", "staging", "poc")


# ---- helpers --------------------------------------------------------------------------------------


def roots(slack: FakeSlack, channel: str = CHANNEL) -> list[Message]:
    return [m for m in slack.messages(channel) if not m.is_reply and m.ephemeral_to is None]


def told(slack: FakeSlack, user: str) -> list[str]:
    """Every private text the bot showed `user` (ephemeral, or through the request's response_url)."""
    return slack.told(user)


def live_image(sandbox: Sandbox, env: str, deployment: str = "funnelcake-relay") -> str:
    assert sandbox.clusters is not None
    dep = sandbox.clusters[env].store.get("deployments", "funnelcake", deployment)
    assert dep is not None
    return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])


def deployed_short(sandbox: Sandbox, env: str) -> str:
    assert sandbox.git is not None
    return sandbox.git.app.short(sandbox.git.deployed[env])


async def push_head(sandbox: Sandbox) -> str:
    """CI built the app repo's head into the production registry (multi-arch), as it does for every merge."""
    assert sandbox.git is not None
    short = sandbox.git.app.commits["head"][:7]
    for image in IMAGES:
        await sandbox.registries.push("production", image, short, "multi", seed=f"{image}:{short}")
    return short


async def eventually(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def ack_of(bot: RunningBot, slack: FakeSlack, text: str, *, user: str = "U0ALICE") -> str:
    """Send a signed slash command over HTTP; return the ack's message, checking what Slack would show.

    Slack shows a slash command's HTTP answer to the invoker only (ephemeral) when it is plain text, or
    JSON without `"response_type": "in_channel"`; it must arrive within 3 s.
    """
    assert bot.http is not None
    body, headers = slack.signed_slash_command(text, user_id=user, channel_id=CHANNEL)
    started = time.monotonic()
    async with bot.http.post(f"{bot.url}/slack/events", data=body, headers=headers) as resp:
        raw = await resp.text()
        assert resp.status == 200, (resp.status, raw)
        ctype = resp.content_type
    assert time.monotonic() - started < ACK_DEADLINE, f"the ack for {text!r} took too long"
    if ctype == "application/json":
        data = json.loads(raw)
        assert data.get("response_type", "ephemeral") == "ephemeral", data
        return str(data["text"])
    assert ctype == "text/plain", ctype
    return raw


def section_texts(blocks: list[dict[str, Any]]) -> list[str]:
    return [str(b["text"]["text"]) for b in blocks if b.get("type") == "section" and b.get("text")]


def assert_within_slack_limits(blocks: list[dict[str, Any]]) -> None:
    assert 0 < len(blocks) <= MAX_BLOCKS, len(blocks)
    for text in section_texts(blocks):
        assert len(text) <= MAX_SECTION_TEXT, len(text)


@pytest.fixture
async def socket_mode(bot: RunningBot, slack_sandbox: FakeSlack) -> AsyncIterator[AsyncSocketModeHandler]:
    """The same front also connected over Socket Mode, the way `python -m bot` runs it in socket mode."""
    assert bot.front is not None
    handler = AsyncSocketModeHandler(bot.front.app, slack_sandbox.app_token, web_client=bot.front.client)
    await handler.connect_async()  # type: ignore[no-untyped-call]
    try:
        await slack_sandbox.wait_connected(timeout=10)
        yield handler
    finally:
        await handler.close_async()  # type: ignore[no-untyped-call]


async def started_bot(sandbox: Sandbox, slack: FakeSlack, **kw: Any) -> RunningBot:
    running = RunningBot(sandbox, slack, **kw)
    await running.start()
    return running


# ---- ack-only answers, status and catch-up --------------------------------------------------------


async def test_help_usage_status_and_catch_up_over_http_and_socket_mode(
    bot: RunningBot,
    slack_sandbox: FakeSlack,
    sandbox: Sandbox,
    socket_mode: AsyncSocketModeHandler,
) -> None:
    # help and usage errors are the ack itself: ephemeral (no in_channel), nothing posted to the channel
    text = await ack_of(bot, slack_sandbox, "help")
    assert "/funnelcake deploy <env>" in text
    assert "Environments: production, staging, poc" in text
    text = await ack_of(bot, slack_sandbox, "deploy moon e7e79eb")
    assert "Unknown environment `moon`" in text
    assert "`production`, `staging`, `poc`" in text
    text = await ack_of(bot, slack_sandbox, "deploy prod e7e79eb")
    assert "Did you mean `production`?" in text
    text = await ack_of(bot, slack_sandbox, "deploy staging")
    assert "needs a commit" in text
    assert "Usage:" in text
    text = await ack_of(bot, slack_sandbox, "frobnicate")
    assert "Unknown command `frobnicate`" in text
    # the same through a Socket Mode envelope: the answer rides on the envelope's ack
    ack = await slack_sandbox.send_slash("deploy staging,moon e7e79eb")
    assert "Unknown environment `moon`" in ack["payload"]["text"]
    ack = await slack_sandbox.send_slash("help rollback")
    assert "/funnelcake rollback <env>" in ack["payload"]["text"]
    await bot.settle()
    assert slack_sandbox.calls_to("chat.postMessage") == []
    assert slack_sandbox.calls_to("chat.postEphemeral") == []

    # status over Socket Mode: one channel message for three envs, accepted by Slack's block validation
    ack = await slack_sandbox.send_slash("status")
    assert "Working on it" in ack["payload"]["text"]
    await bot.settle()
    [call] = slack_sandbox.calls_to("chat.postMessage")
    assert call.ok, call.response
    blocks: list[dict[str, Any]] = call.params["blocks"]
    assert_within_slack_limits(blocks)
    text = "\n".join(section_texts(blocks))
    for env in ENVS:
        assert f"*{env}*" in text
    [status] = roots(slack_sandbox)
    prod = deployed_short(sandbox, "production")
    catchup = {b["action_id"]: json.loads(b["value"]) for b in status.buttons()}
    # staging and poc run older commits than production: one catch-up button each, carrying the command
    # it stands for and the tag the env ran when it was drawn
    assert catchup == {
        "catchup-staging": {"cmd": f"deploy staging {prod}", "ran": deployed_short(sandbox, "staging")},
        "catchup-poc": {"cmd": f"deploy poc {prod}", "ran": deployed_short(sandbox, "poc")},
    }, catchup

    # one click (over Socket Mode) brings poc to production's commit; a new status no longer offers it
    click = await slack_sandbox.click(CHANNEL, status.ts, "catchup-poc", user_id="U0ALICE")
    assert click["envelope_id"]
    await bot.settle()
    assert bot.service is not None
    [record] = await bot.service.history("poc", 1)
    assert record.kind is DeployKind.DEPLOY
    assert record.short == prod
    assert record.state is DeployState.SUCCEEDED, record.message
    assert live_image(sandbox, "poc").endswith(f":{prod}")
    assert "Working on it" in await ack_of(bot, slack_sandbox, "status")
    await bot.settle()
    latest = slack_sandbox.calls_to("chat.postMessage")[-1]
    assert latest.ok
    assert_within_slack_limits(latest.params["blocks"])
    actions = [b["action_id"] for m in roots(slack_sandbox)[-1:] for b in m.buttons()]
    assert actions == ["catchup-staging"], actions


# ---- approvals ------------------------------------------------------------------------------------


async def awaiting_approval(bot: RunningBot, slack: FakeSlack, short: str, requester: str) -> Message:
    """Ask for a production deploy and return its root message once it shows Approve / Deny."""
    assert "Working on it" in await ack_of(bot, slack, f"deploy production {short}", user=requester)

    def ready() -> Message | None:
        for m in roots(slack):
            mine = f"*Requested by* <@{requester}>" in json.dumps(m.blocks, ensure_ascii=False)
            if mine and [b["action_id"] for b in m.buttons()] == ["approve", "deny"]:
                return m
        return None

    message: Message = await eventually(ready, timeout=30, what=f"approval buttons on {requester}'s deploy")
    return message


async def test_approvers_are_reminded_once_before_the_request_expires(
    sandbox: Sandbox, slack_sandbox: FakeSlack
) -> None:
    assert sandbox.config is not None
    expiry = 12.0  # the reminder goes a third of the window before it ends (5 min before, in the shipped 30)
    sandbox.config = sandbox.config.model_copy(
        update={"timeouts": sandbox.config.timeouts.model_copy(update={"approval": expiry})}
    )
    bot = await started_bot(sandbox, slack_sandbox)
    try:
        assert bot.service is not None
        short = await push_head(sandbox)
        root = await awaiting_approval(bot, slack_sandbox, short, "U0ALICE")
        asked_at = time.monotonic()

        def reminders() -> list[Message]:
            return [m for m in slack_sandbox.thread(CHANNEL, root.ts) if m.text.startswith("⏰")]

        await bot.service.recover()
        assert reminders() == []  # not due yet
        await asyncio.sleep(
            max(0.0, expiry - bot.service.reminder_lead.total_seconds() + 0.5 - (time.monotonic() - asked_at))
        )
        await asyncio.gather(bot.service.recover(), bot.service.recover())  # two passes at once: one reminder
        await bot.settle()
        [reminder] = reminders()
        assert reminder.text.startswith(
            "⏰ <!subteam^S0APPROVERS>: <@U0ALICE>'s request for production still waits"
        )
        assert "expires <!date^" in reminder.text
        assert "Approve or Deny on the message above" in reminder.text
        # the request is untouched: its buttons stay, and a later pass does not remind again
        assert [b["action_id"] for b in slack_sandbox.message(CHANNEL, root.ts).buttons()] == [
            "approve",
            "deny",
        ]
        await bot.service.recover()
        await bot.settle()
        assert len(reminders()) == 1
    finally:
        await bot.stop()


async def test_deny_and_expiry_leave_production_untouched(sandbox: Sandbox, slack_sandbox: FakeSlack) -> None:
    assert sandbox.config is not None
    assert sandbox.git is not None
    # approvals expire after a few seconds here (30 min in the shipped config)
    expiry = 4.0
    sandbox.config = sandbox.config.model_copy(
        update={"timeouts": sandbox.config.timeouts.model_copy(update={"approval": expiry})}
    )
    bot = await started_bot(sandbox, slack_sandbox)
    try:
        short = await push_head(sandbox)
        live_before = live_image(sandbox, "production")
        gitops_before = remote_head(sandbox.git.gitops.path)
        assert bot.service is not None

        # both wait for approval at once; neither holds production while it waits
        denied_root, expiring_root = await asyncio.gather(
            awaiting_approval(bot, slack_sandbox, short, "U0ALICE"),
            awaiting_approval(bot, slack_sandbox, short, "U0CAROL"),
        )
        asked_at = time.monotonic()

        # Dave is no approver (nor the requester): his deny is refused and changes nothing
        await bot.click(expiring_root.ts, "deny", user="U0DAVE")
        await bot.settle()
        assert any("Not allowed" in t for t in told(slack_sandbox, "U0DAVE")), told(slack_sandbox, "U0DAVE")
        assert [b["action_id"] for b in slack_sandbox.message(CHANNEL, expiring_root.ts).buttons()] == [
            "approve",
            "deny",
        ]

        # Bob denies Alice's at once
        await bot.click(denied_root.ts, "deny", user="U0BOB")
        await bot.settle()
        root = slack_sandbox.message(CHANNEL, denied_root.ts)
        assert root.buttons() == []
        assert "Denied by @bob" in slack_sandbox.transcript(CHANNEL)
        assert "Denied by <@U0BOB>" in json.dumps(root.blocks)
        [denied] = [r for r in await bot.service.history("production", 2) if r.requester == "U0ALICE"]
        assert denied.state is DeployState.DENIED
        assert denied.approver is None
        assert denied.thread_ts == denied_root.ts

        # Carol's waits past its expiry; Bob's approve click is then refused and the message says so
        await asyncio.sleep(max(0.0, expiry + 0.5 - (time.monotonic() - asked_at)))
        await bot.click(expiring_root.ts, "approve", user="U0BOB")
        await bot.settle()
        assert any("expired" in t for t in told(slack_sandbox, "U0BOB")), told(slack_sandbox, "U0BOB")
        root = slack_sandbox.message(CHANNEL, expiring_root.ts)
        assert root.buttons() == []
        assert "Approval expired" in json.dumps(root.blocks)
        expired = await bot.service.history("production", 2)
        states = {r.requester: r.state for r in expired}
        assert states == {"U0ALICE": DeployState.DENIED, "U0CAROL": DeployState.EXPIRED}, states

        # nothing was deployed: no git change, the cluster runs what it ran, no deploy is in flight
        assert remote_head(sandbox.git.gitops.path) == gitops_before
        assert live_image(sandbox, "production") == live_before
        assert await bot.service.deps.ledger.in_flight() == []
        assert await bot.service.deps.ledger.get_lease("production") is None
    finally:
        await bot.stop()


# ---- Slack's real posting rate --------------------------------------------------------------------


@pytest.fixture
async def slack_at_real_rate() -> AsyncIterator[FakeSlack]:
    """Slack's chat.postMessage limit: about one per second per channel, then 429. No burst allowance, so the
    two deploys' first posts collide however slowly a loaded machine runs them."""
    async with FakeSlack(post_interval=1.0, post_burst=1) as slack:
        yield slack


async def test_two_deploys_in_one_rate_limited_channel_lose_nothing(
    sandbox: Sandbox, slack_at_real_rate: FakeSlack
) -> None:
    slack = slack_at_real_rate
    # the reporter batches at its shipped pace (1 s), as in production
    bot = await started_bot(sandbox, slack, reporter_interval=1.0)
    try:
        short = await push_head(sandbox)
        acks = await asyncio.gather(
            ack_of(bot, slack, f"deploy staging {short}", user="U0ALICE"),
            ack_of(bot, slack, f"deploy poc {short}", user="U0BOB"),
        )
        assert all("Working on it" in a for a in acks), acks
        await bot.settle(timeout=150)
        assert bot.service is not None

        posts = slack.calls_to("chat.postMessage")
        limited = [c for c in posts if c.status == 429]
        assert limited, "the two deploys never hit Slack's rate limit: the test proves nothing"
        assert all(c.error == "ratelimited" for c in limited)
        # each refused post was sent again later and accepted: nothing was dropped
        for refused in limited:
            assert any(c.ok and c.at > refused.at and c.params == refused.params for c in posts), (
                refused.params
            )
        accepted = [c for c in posts if c.ok]
        assert len(accepted) + len(limited) == len(posts), [c.response for c in posts if not c.ok]
        channel = [m for m in slack.messages(CHANNEL) if m.ephemeral_to is None]
        assert len(accepted) == len(channel) + sum(len(m.replies) for m in channel)  # and none twice

        for env, user in (("staging", "U0ALICE"), ("poc", "U0BOB")):
            [record] = await bot.service.history(env, 1)
            assert record.state is DeployState.SUCCEEDED, record.message
            assert record.requester == user
            assert live_image(sandbox, env).endswith(f":{short}")
            root = slack.message(CHANNEL, str(record.thread_ts))
            assert f"→ {env}" in root.text
            assert root.buttons() == []
            assert "Done" in json.dumps(root.blocks, ensure_ascii=False)  # the final chat.update landed
            thread = "\n".join(r.text for r in slack.thread(CHANNEL, root.ts))
            # every step the ledger recorded is in the thread, and the final summary after them
            recorded = {s.step for s in await bot.service.deps.ledger.steps(record.id)} - {"deploy"}
            assert {"resolve", "preflight", "images", "gitops", "sync", "rollout", "verify"} <= recorded
            done_at = thread.index("🎉 *Done*")  # the outcome is the summary, after every step
            for step in recorded:
                assert 0 <= thread.find(f"*{step}*") < done_at, (env, step, thread)
    finally:
        await bot.stop()


# ---- a failed rollout and its way back ------------------------------------------------------------


async def test_failed_rollout_shows_its_diagnosis_and_rolls_back(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox
) -> None:
    assert sandbox.clusters is not None
    assert bot.service is not None
    short = await push_head(sandbox)
    previous = deployed_short(sandbox, "staging")
    assert live_image(sandbox, "staging").endswith(f":{previous}")
    # The manifest says linux/amd64, so preflight and the images step rightly pass, but the binaries
    # inside were built for arm64: on the node they die with `exec format error` (a Mac cross-build).
    sandbox.clusters["staging"].exec_format_tags.add(short)

    assert "Working on it" in await ack_of(bot, slack_sandbox, f"deploy staging {short}")
    await bot.settle()
    [record] = await bot.service.history("staging", 1)
    assert record.state is DeployState.FAILED
    steps = {s.step: s.state.value for s in await bot.service.deps.ledger.steps(record.id)}
    assert steps["images"] == "ok"
    assert steps["gitops"] == "ok"
    assert steps["rollout"] == "failed"

    root = slack_sandbox.message(CHANNEL, str(record.thread_ts))
    drawn_for = {"cmd": "rollback staging", "ran": short}  # the tag this failed deploy put there
    assert [(b["action_id"], json.loads(b["value"])) for b in root.buttons()] == [("rollback", drawn_for)]
    assert "Failed" in json.dumps(root.blocks, ensure_ascii=False)
    [diagnosis] = [r for r in slack_sandbox.thread(CHANNEL, root.ts) if "Diagnosis" in json.dumps(r.blocks)]
    text = "\n".join(section_texts(diagnosis.blocks or []))
    assert "🩺 *Diagnosis* (staging)" in text
    assert "exec format error" in text  # the cause, and the container's own log line as evidence
    assert "*Evidence*" in text
    assert "*Fix*" in text
    assert "linux/amd64" in text
    # the diagnoser's details, briefly, under the fix: which container, how it exited, how often it restarted
    [details] = [
        e["text"] for b in diagnosis.blocks or [] if b.get("type") == "context" for e in b["elements"]
    ]
    assert "exit code: " in details and "restarts: " in details, details
    assert "image: " in details and short in details, details
    assert [(b["action_id"], json.loads(b["value"])) for b in diagnosis.buttons()] == [
        ("rollback", drawn_for),
        ("rebuild", {"cmd": f"deploy staging {short}", "ran": short}),
    ]
    assert_within_slack_limits(diagnosis.blocks or [])

    # Roll back from the diagnosis: the previous tag is deployed again and the cluster runs it
    await bot.click(diagnosis.ts, "rollback", user="U0BOB")
    await bot.settle()
    [rollback] = await bot.service.history("staging", 1)
    assert rollback.kind is DeployKind.ROLLBACK
    assert rollback.short == previous
    assert rollback.state is DeployState.SUCCEEDED, rollback.message
    assert rollback.requester == "U0BOB"
    for deployment in ("funnelcake-api", "funnelcake-relay"):
        assert live_image(sandbox, "staging", deployment).endswith(f":{previous}")
    dep = sandbox.clusters["staging"].store.get("deployments", "funnelcake", "funnelcake-relay")
    assert dep is not None
    assert dep["status"]["readyReplicas"] == dep["spec"]["replicas"]
    back = slack_sandbox.message(CHANNEL, str(rollback.thread_ts))
    assert f"Roll back staging to {previous}" in back.text
    assert "🎉 *Done*" in "\n".join(r.text for r in slack_sandbox.thread(CHANNEL, back.ts))


# ---- migration copy -------------------------------------------------------------------------------


async def test_migrate_and_force_migrate_say_what_they_did(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox
) -> None:
    assert sandbox.git is not None
    assert bot.service is not None
    ledger = bot.service.deps.ledger
    # a successful migrate: its bar counts its own 4 steps, not a deploy's 8
    head = sandbox.git.app.short("head")
    await push_head(sandbox)
    assert "Working on it" in await ack_of(bot, slack_sandbox, f"migrate staging {head}")
    await bot.settle()
    [ok] = await bot.service.history("staging", 1)
    assert ok.state is DeployState.SUCCEEDED, ok.message
    root = slack_sandbox.message(CHANNEL, str(ok.thread_ts))
    shown = json.dumps(root.blocks, ensure_ascii=False)
    assert "4/4" in shown and "/8" not in shown, shown

    # a migration that fails half-way, then the guarded force from the thread's button
    broken = sandbox.git.app.short("broken")
    for image in IMAGES:
        await sandbox.registries.push("staging", image, broken, "amd64", seed=f"{image}:{broken}")
    await ack_of(bot, slack_sandbox, f"migrate staging {broken}")
    await bot.settle()
    [dirty] = await bot.service.history("staging", 1)
    assert dirty.state is DeployState.FAILED
    [offer] = [m for m in slack_sandbox.thread(CHANNEL, str(dirty.thread_ts)) if m.buttons()]
    await bot.click(offer.ts, "force_migrate", user="U0BOB")
    await bot.settle()
    [forced] = await bot.service.history("staging", 1)
    assert forced.kind is DeployKind.FORCE_MIGRATE
    assert forced.state is DeployState.SUCCEEDED, forced.message
    root = slack_sandbox.message(CHANNEL, str(forced.thread_ts))
    shown = json.dumps(root.blocks, ensure_ascii=False)
    assert "Force migration version 4 in staging, then migrate up" in shown
    assert "*Version* `4` (marked clean with `force`, then `migrate up` runs)" in shown
    assert "*Commit* `4`" not in shown
    assert "of `None`" not in shown
    assert "version 4 forced clean in staging, then `migrate up` ran: " in shown
    assert "1/1" in shown
    applied = next(s for s in await ledger.steps(forced.id) if s.step == "force-migrate")
    assert applied.detail is not None
    for name in applied.detail["applied"] or ["no change"]:
        assert name in shown


async def test_history_pages_end_with_the_command_for_the_older_ones(
    bot: RunningBot, slack_sandbox: FakeSlack, socket_mode: AsyncSocketModeHandler
) -> None:
    slack = slack_sandbox
    assert bot.service is not None
    ledger = bot.service.deps.ledger
    made = [
        (
            await ledger.create_deploy(
                kind=DeployKind.DEPLOY, envs=["poc"], ref=f"c{i:06d}", short=f"c{i:06d}", requester="U0BOB"
            )
        ).id
        for i in range(3)
    ]

    def pages() -> list[str]:
        return [
            m.shown
            for ch in slack.channels()
            for m in slack.messages(ch)
            if m.ephemeral_to == "U0ALICE" and "History" in m.shown
        ]

    await slack.send_slash("history poc --limit 2")
    async with asyncio.timeout(30):
        while not pages():
            await asyncio.sleep(0.05)
    first = pages()[0]
    assert made[2] in first and made[1] in first and made[0] not in first
    assert f"Older deploys: `/funnelcake history poc --limit 2 --before {made[1]}`" in first
    # what it says to type lists the rest, and that last page offers nothing older
    await slack.send_slash(f"history poc --limit 2 --before {made[1]}")
    async with asyncio.timeout(30):
        while len(pages()) < 2:
            await asyncio.sleep(0.05)
    last = pages()[1]
    assert made[0] in last and made[1] not in last
    assert "Older deploys" not in last
