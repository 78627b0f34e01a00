"""The watcher, with two real bot processes sharing PostgreSQL: breakage done by hand, as a colleague
following the old runbook would (an arm64 build pushed to the registry, `sed` on the overlay, an Argo CD
sync), is posted once, with the deploy's diagnosis and a Roll back that works, and closed as recovered.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.ledger import Ledger
from tests.testbed.botproc import BotProcess
from tests.testbed.gitrepos import overlay_path, push_from_second_clone
from tests.testbed.pg import ThrowawayPostgres, postgres  # noqa: F401 - a fixture
from tests.testbed.sandbox import Sandbox
from tests.testbed.scenario import WAIT, board, by_hand, launch, set_tag, until_board
from tests.testbed.slack import DEFAULT_CHANNEL, FakeSlack, Message

pytestmark = pytest.mark.timeout(300)


def watch_here(sandbox: Sandbox) -> None:
    sandbox.reconfigure(watch={"channel": DEFAULT_CHANNEL, "every": 1.0})


def posts(slack: FakeSlack, needle: str) -> list[Message]:
    return [m for m in slack.messages(DEFAULT_CHANNEL) if needle in m.text]


async def one_post(slack: FakeSlack, needle: str, *bots: BotProcess) -> Message:
    try:
        async with asyncio.timeout(WAIT):
            while not posts(slack, needle):
                await asyncio.sleep(0.1)
    except TimeoutError:
        logs = "\n".join(f"--- {b.name}\n{b.tail(3000)}" for b in bots)
        raise AssertionError(
            f"no post with {needle!r}:\n{slack.transcript(DEFAULT_CHANNEL)}\n{logs}"
        ) from None
    return posts(slack, needle)[0]


async def until_text(slack: FakeSlack, ts: str, needle: str, *bots: BotProcess) -> Message:
    """The message once what a reader sees of it (its blocks) says `needle`."""
    try:
        async with asyncio.timeout(WAIT):
            while needle not in (msg := slack.message(DEFAULT_CHANNEL, ts)).shown:
                await asyncio.sleep(0.1)
    except TimeoutError:
        logs = "\n".join(f"--- {b.name}\n{b.tail(3000)}" for b in bots)
        shown = slack.message(DEFAULT_CHANNEL, ts).shown
        raise AssertionError(f"message {ts} never showed {needle!r}:\n{shown}\n{logs}") from None
    return msg


async def incidents_gauge(*bots: BotProcess) -> float:
    """funnelcake_bot_incidents_open{env="staging",kind="pods_failing"} as the bot that watches serves it on /metrics
    (the other replica never set it)."""
    values = []
    async with aiohttp.ClientSession() as session:
        for bot in bots:
            async with session.get(f"{bot.url}/metrics") as resp:
                text = await resp.text()
            for family in text_string_to_metric_families(text):
                values += [
                    s.value
                    for s in family.samples
                    if s.name == "funnelcake_bot_incidents_open"
                    and s.labels == {"env": "staging", "kind": "pods_failing"}
                ]
    assert len(values) == 1, values  # one watcher, whichever it is
    return values[0]


async def test_hand_made_breakage_is_posted_once_with_two_replicas_and_closed_after_the_rollback(
    sandbox: Sandbox,
    slack_sandbox: FakeSlack,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
    bots: list[BotProcess],
) -> None:
    slack = slack_sandbox
    assert sandbox.git is not None
    watch_here(sandbox)
    one = await launch(bots, sandbox, slack, "one", database_url=postgres.url, mode="http")
    two = await launch(bots, sandbox, slack, "two", database_url=postgres.url, mode="http")

    # ---- a colleague builds the relay on an arm64 Mac, pushes it to staging's registry, edits, syncs
    tag = "badc0de"
    await sandbox.registries.push("staging", "funnelcake-relay", tag, "arm64", seed="mac-build")
    sha = push_from_second_clone(
        sandbox.git.gitops.url, overlay_path("relay", "staging"), set_tag("relay", tag), "relay: try my build"
    )
    await by_hand(sandbox, "staging", "funnelcake-relay", sync=True)

    incident = await one_post(slack, "funnelcake-relay pods failing in staging", one, two)
    text = incident.shown
    assert "arm64" in text, text  # the deploy's own diagnosis: the image is for the wrong platform
    assert "*Fix*" in text
    assert [b.get("action_id") for b in incident.buttons()] == ["rollback", "rebuild"]
    dialog = incident.buttons()[0]["confirm"]  # a danger button says what it will do before it does it
    assert dialog["title"]["text"] == "Roll back staging?"
    assert "Roll *staging* back to the last tag the bot deployed there successfully" in dialog["text"]["text"]
    notice = await one_post(slack, f"changed staging's overlay by hand in {sha[:7]}", one, two)
    assert "A Colleague" in notice.shown
    assert "relay: try my build" in notice.shown
    assert await incidents_gauge(one, two) == 1.0  # the watching replica counts it
    await asyncio.sleep(4)  # several more looks by whichever replica watches: still one post of each
    assert len(posts(slack, "funnelcake-relay pods failing in staging")) == 1
    assert len(posts(slack, f"changed staging's overlay by hand in {sha[:7]}")) == 1

    # ---- the Roll back button on the incident works, and the incident closes as recovered
    status, _ = await two.deliver(
        *slack.signed_click(DEFAULT_CHANNEL, incident.ts, "rollback", user_id="U0ALICE")
    )
    assert status == 200
    closed = await until_text(slack, incident.ts, "*Recovered* after", one, two)
    assert closed.buttons() == []
    assert "funnelcake-relay pods failing in staging" in closed.text
    assert await incidents_gauge(one, two) == 0.0
    ledger = await Ledger.open(postgres.url)
    try:
        assert await ledger.incidents(open_only=True) == []
        history = await ledger.incidents(open_only=False)
        assert sorted(i.kind for i in history) == ["hand_edit", "pods_failing"]
        assert all(i.closed_at is not None for i in history)
    finally:
        await ledger.close()


async def test_out_of_sync_is_reported_then_cleared_by_a_sync(
    sandbox: Sandbox, slack_sandbox: FakeSlack, bots: list[BotProcess]
) -> None:
    slack = slack_sandbox
    assert sandbox.git is not None
    watch_here(sandbox)
    bot = await launch(bots, sandbox, slack, "solo", mode="http")
    # poc's registry holds the tag (amd64): once synced, the pods run it
    tag = sandbox.git.app.short("relay-tune")
    await sandbox.registries.push("poc", "funnelcake-api", tag, "multi", seed=f"api:{tag}")
    push_from_second_clone(
        sandbox.git.gitops.url, overlay_path("api", "poc"), set_tag("api", tag), "api: bump by hand"
    )
    await by_hand(sandbox, "poc", "funnelcake-api", sync=False)  # refreshed, not synced: OutOfSync

    opened = {"type": "app_home_opened", "user": "U0DAVE", "tab": "home", "channel": "D0DAVE"}
    assert (await bot.deliver(*slack.signed_event(opened)))[0] == 200
    await until_board(slack, "U0DAVE", "*poc*", bot)

    incident = await one_post(slack, "funnelcake-api is OutOfSync in poc", bot)
    assert "git and the cluster differ" in incident.shown
    await until_board(slack, "U0DAVE", "🚨 funnelcake-api is OutOfSync in poc", bot)  # the board follows
    await by_hand(sandbox, "poc", "funnelcake-api", sync=True)
    closed = await until_text(slack, incident.ts, "*Recovered* after", bot)
    assert "OutOfSync" in closed.text
    async with asyncio.timeout(WAIT):
        while "🚨" in board(slack, "U0DAVE").shown:  # and is redrawn without it once it closed
            await asyncio.sleep(0.1)


async def test_a_relay_that_stops_answering_req_is_an_incident_until_it_answers_again(
    sandbox: Sandbox, slack_sandbox: FakeSlack, bots: list[BotProcess]
) -> None:
    """Its pods are Ready and Argo CD is happy: only speaking Nostr to it shows the relay is broken."""
    slack = slack_sandbox
    watch_here(sandbox)
    bot = await launch(bots, sandbox, slack, "solo", mode="http")
    await sandbox.relays["poc"].set_fault("notice")  # the relay's rate limiter answers REQ with a NOTICE

    incident = await one_post(slack, "relay REQ→EOSE fails in poc", bot)
    # while the relay restarts it cannot be reached; once up, the post is updated with the relay's own words
    await until_text(slack, incident.ts, "answered NOTICE “rate-limited” instead of EOSE", bot)
    await sandbox.relays["poc"].set_fault(None)
    closed = await until_text(slack, incident.ts, "*Recovered* after", bot)
    assert closed.buttons() == []


async def gauge(bot: BotProcess, name: str, labels: dict[str, str]) -> float | None:
    async with aiohttp.ClientSession() as session, session.get(f"{bot.url}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


async def test_an_env_behind_production_is_posted_with_a_catch_up_that_works(
    sandbox: Sandbox, slack_sandbox: FakeSlack, bots: list[BotProcess]
) -> None:
    slack = slack_sandbox
    assert sandbox.git is not None
    # production runs relay-tune, staging add-index (one commit older), poc api-paginate (two older)
    sandbox.reconfigure(watch={"channel": DEFAULT_CHANNEL, "every": 1.0, "behind_after": 0})
    bot = await launch(bots, sandbox, slack, "solo", mode="http")
    prod, staging = sandbox.git.app.short("relay-tune"), sandbox.git.app.short("add-index")

    incident = await one_post(slack, "staging is 1 commit behind production", bot)
    assert f"({staging} → {prod})" in incident.shown
    assert "relay: raise subscription limit" in incident.shown  # the commit staging lacks
    [button] = incident.buttons()
    assert (button["action_id"], button["text"]["text"]) == ("catchup", f"Catch up to {prod}")
    await one_post(slack, "poc is 2 commits behind production", bot)
    metric = "funnelcake_bot_commits_behind_production"
    assert await gauge(bot, metric, {"env": "staging"}) == 1.0
    assert await gauge(bot, metric, {"env": "poc"}) == 2.0
    assert await gauge(bot, metric, {"env": "production"}) == 0.0

    status, _ = await bot.deliver(
        *slack.signed_click(DEFAULT_CHANNEL, incident.ts, "catchup", user_id="U0ALICE")
    )
    assert status == 200
    closed = await until_text(slack, incident.ts, "*Recovered* after", bot)
    assert closed.buttons() == []
    assert await gauge(bot, metric, {"env": "staging"}) == 0.0
    assert len(posts(slack, "staging is 1 commit behind production")) == 1
