"""Faults injected into real bot processes at the step boundaries that matter: the ledger cut off (through a
TCP proxy, as a network partition does) for longer than the lease with two replicas and for less with one,
SQLite's disk full, SIGTERM, and Cancel clicked on either replica.

Every scenario ends with the same account (`settled`): the ledger's final state matches what the GitOps
remote and the cluster show, the deploy was pushed at most once, every step that ran has its row, the
thread carries exactly one final message, no lease is left held and no bot logged a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import yaml

from bot.ledger import DeployRecord, DeployState, Ledger, StepState
from tests.testbed.botproc import BotProcess
from tests.testbed.disk import fill, small_disk
from tests.testbed.gitrepos import overlay_path, remote_file, remote_head
from tests.testbed.pg import PG_HOST, PG_PORT, ThrowawayPostgres, postgres  # noqa: F401 - a fixture
from tests.testbed.sandbox import Sandbox
from tests.testbed.scenario import (
    WAIT,
    assert_clean_log,
    deploy_commits,
    frozen,
    launch,
    newest,
    push_head,
    running_images,
    step_names,
    wait_finished,
    wait_step_running,
    wait_thread,
)
from tests.testbed.slack import DEFAULT_CHANNEL, FakeSlack, Message
from tests.testbed.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(300)

TTL = 4.0  # the bots' LEASE_TTL (the BotProcess default)
FINAL = ("🎉 *Done*", "🛑 *Cancelled*", "💥 *Failed*")
SUCCESS_STEPS = ["resolve", "preflight", "images", "migrate", "gitops", "sync", "rollout", "verify"]


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A cuttable path to the machine's PostgreSQL."""
    async with TcpProxy((PG_HOST, PG_PORT)) as p:
        yield p


def through(proxy: TcpProxy, db: ThrowawayPostgres) -> str:
    return db.url.replace(f"{PG_HOST}:{PG_PORT}", proxy.address)


def overlay_tags(sandbox: Sandbox, env: str, rev: str) -> dict[str, str]:
    """The tag each service's overlay names on the GitOps remote at `rev`."""
    assert sandbox.git is not None
    tags = {}
    for service in ("api", "relay"):
        doc = yaml.safe_load(remote_file(sandbox.git.gitops.path, overlay_path(service, env), rev))
        tags[service] = str(doc["images"][0]["newTag"])
    return tags


def final_messages(slack: FakeSlack, record: DeployRecord) -> list[Message]:
    assert record.thread_ts, record
    return [
        m
        for m in slack.thread(DEFAULT_CHANNEL, record.thread_ts)
        if any(marker in m.text for marker in FINAL)
    ]


async def one_final_message(slack: FakeSlack, record: DeployRecord) -> Message:
    """The thread's final message, once the reporter wrote it (it batches about once a second); a second
    one (two bots each telling their own ending) fails the test."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            while not final_messages(slack, record):
                await asyncio.sleep(0.1)
    await asyncio.sleep(1.5)  # a second writer would have flushed by now
    finals = final_messages(slack, record)
    assert len(finals) == 1, [m.text for m in slack.thread(DEFAULT_CHANNEL, record.thread_ts or "")]
    return finals[0]


async def settled(
    ledger: Ledger,
    sandbox: Sandbox,
    slack: FakeSlack,
    deploy_id: str,
    *,
    gitops_before: str,
    pushed: bool,
    state: DeployState,
    live: tuple[BotProcess, ...],
) -> DeployRecord:
    """Wait for the deploy's end and check the whole account of it; return the final record."""
    assert sandbox.git is not None
    record = await wait_finished(ledger, deploy_id, *live)
    assert record.state is state, (record.state, record.message)
    commits = deploy_commits(sandbox, gitops_before)
    assert commits == ([f"deploy(poc): funnelcake @ {record.short}"] if pushed else []), commits
    # the overlay on the remote says what the ledger says: moved to the deploy's commit, or not at all
    tags = overlay_tags(sandbox, "poc", remote_head(sandbox.git.gitops.path))
    assert tags == (
        {"api": record.short, "relay": record.short}
        if pushed
        else overlay_tags(sandbox, "poc", gitops_before)
    ), tags
    steps = await ledger.steps(deploy_id)
    ok = step_names(steps, StepState.OK)
    assert ok.count("gitops") == (1 if pushed else 0), ok
    if state is DeployState.SUCCEEDED:
        assert [s for s in SUCCESS_STEPS if s not in ok] == [], ok  # every step has its row
        prefix = sandbox.registries.prefix("poc")
        assert running_images(sandbox, "poc") == {
            s: f"{prefix}/funnelcake-{s}:{record.short}" for s in ("api", "relay")
        }
    assert not [s.step for s in steps if s.state is StepState.RUNNING], [(s.step, s.state) for s in steps]
    final = await one_final_message(slack, record)
    # it tells the requester, and anything but a success is also shown in the channel
    assert final.text.startswith(f"<@{record.requester}> "), final.text
    assert final.broadcast is (state is not DeployState.SUCCEEDED)
    assert await ledger.get_lease("poc") is None
    for bot in live:
        assert_clean_log(bot)
    return record


def sync_count(sandbox: Sandbox) -> int:
    """How many sync operations the bots asked poc's Argo CD to run for the api app (the test bed's own
    first sync, by platform-team, set the cluster up)."""
    assert sandbox.clusters is not None
    app = sandbox.clusters["poc"].store.get("applications", "argocd", "funnelcake-api")
    assert app is not None
    history = app.get("status", {}).get("history") or []
    return sum(1 for h in history if h.get("initiatedBy", {}).get("username") != "platform-team")


async def slash(bot: BotProcess, slack: FakeSlack, text: str, user: str = "U0ALICE") -> str:
    status, body = await bot.deliver(*slack.signed_slash_command(text, user_id=user))
    assert status == 200, (status, body, bot.tail())
    return body


async def click(bot: BotProcess, slack: FakeSlack, record: DeployRecord, action: str, user: str) -> None:
    assert record.thread_ts
    status, body = await bot.deliver(
        *slack.signed_click(DEFAULT_CHANNEL, record.thread_ts, action, user_id=user)
    )
    assert status == 200, (status, body, bot.tail())


async def until(what: str, check: object, *bots: BotProcess) -> None:
    """Poll `check()` (sync or async) until it is true; on a timeout, show the bots' logs."""
    try:
        async with asyncio.timeout(WAIT):
            while True:
                got = check()  # type: ignore[operator]
                if asyncio.iscoroutine(got):
                    got = await got
                if got:
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        logs = "\n".join(f"--- {b.name}\n{b.tail(3000)}" for b in bots)
        raise AssertionError(f"{what} did not happen within {WAIT} s\n{logs}") from None


# ---- two replicas, the ledger cut off from the one running the deploy for longer than the lease --------


@pytest.mark.parametrize("at", ["preflight", "migrate"])
async def test_partition_before_the_push_the_cut_off_bot_pushes_nothing(
    slow_sandbox: Sandbox,
    slack_sandbox: FakeSlack,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
    proxy: TcpProxy,
    bots: list[BotProcess],
    at: str,
) -> None:
    """Cut off before promotion (held there by a hung registry) or after it, with the migration Job running:
    either way the bot cannot prove its lease before the push, so it never pushes."""
    sandbox, slack = slow_sandbox, slack_sandbox
    assert sandbox.git is not None
    short = await push_head(sandbox)
    before = remote_head(sandbox.git.gitops.path)
    cut_off = await launch(bots, sandbox, slack, "a", database_url=through(proxy, postgres), mode="http")
    other = await launch(bots, sandbox, slack, "b", database_url=postgres.url, mode="http")
    ledger = await Ledger.open(postgres.url)
    try:
        hung = frozen(sandbox.registries["poc"].pid) if at == "preflight" else contextlib.nullcontext()
        with hung:  # the poc registry hangs: a's preflight waits on it
            await slash(cut_off, slack, f"deploy poc {short}")
            record = await wait_step_running(ledger, at, cut_off)
            proxy.cut()
            # b sees a's lease lapse, finds nothing pushed, and ends the deploy as interrupted
            ended = await wait_finished(ledger, record.id, other)
            assert ended.state is DeployState.INTERRUPTED, ended.message
            assert ended.owner != record.owner
        proxy.restore()  # a's promotion and ledger come back: it must notice it lost the deploy
        thread_of = await ledger.get_deploy(record.id)
        await wait_thread(slack, thread_of.thread_ts or "", "left the deploy to another bot")
        await asyncio.sleep(2 * TTL)  # anything a stale a would still do, it would have done by now
        final = await settled(
            ledger,
            sandbox,
            slack,
            record.id,
            gitops_before=before,
            pushed=False,
            state=DeployState.INTERRUPTED,
            live=(
                cut_off,
                other,
            ),
        )
        assert "nothing was pushed" in (final.message or ""), final.message
        assert sync_count(sandbox) == 0
    finally:
        await ledger.close()


async def test_partition_after_the_push_the_other_replica_finishes_and_the_cut_off_bot_stops(
    slow_sandbox: Sandbox,
    slack_sandbox: FakeSlack,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
    proxy: TcpProxy,
    bots: list[BotProcess],
) -> None:
    sandbox, slack = slow_sandbox, slack_sandbox
    assert sandbox.git is not None
    short = await push_head(sandbox)
    before = remote_head(sandbox.git.gitops.path)
    cut_off = await launch(bots, sandbox, slack, "a", database_url=through(proxy, postgres), mode="http")
    other = await launch(bots, sandbox, slack, "b", database_url=postgres.url, mode="http")
    ledger = await Ledger.open(postgres.url)
    try:
        await slash(cut_off, slack, f"deploy poc {short}")
        record = await wait_step_running(ledger, "rollout", cut_off)
        syncs_before_cut = sync_count(sandbox)
        proxy.cut()
        final = await settled(
            ledger,
            sandbox,
            slack,
            record.id,
            gitops_before=before,
            pushed=True,
            state=DeployState.SUCCEEDED,
            live=(other,),
        )
        assert final.owner not in (None, record.owner)
        proxy.restore()
        await wait_thread(slack, final.thread_ts or "", "left the deploy to another bot", "took over from")
        await asyncio.sleep(2 * TTL)
        # after the cut only b acted: one more sync (its own), and a wrote nothing over b's ending
        assert sync_count(sandbox) == syncs_before_cut + 1
        again = await ledger.get_deploy(record.id)
        assert (again.state, again.owner, again.epoch) == (final.state, final.owner, final.epoch)
        assert len(final_messages(slack, final)) == 1
        assert_clean_log(cut_off)
    finally:
        await ledger.close()


# ---- one replica: an outage shorter than the lease is weathered, a longer one healed -------------------


async def test_a_short_ledger_outage_during_the_rollout_changes_nothing(
    slow_sandbox: Sandbox,
    slack_sandbox: FakeSlack,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
    proxy: TcpProxy,
    bots: list[BotProcess],
) -> None:
    sandbox, slack = slow_sandbox, slack_sandbox
    assert sandbox.git is not None
    short = await push_head(sandbox)
    before = remote_head(sandbox.git.gitops.path)
    # a 10 s lease and a 3 s outage: well inside it even on a loaded machine
    bot = await launch(
        bots, sandbox, slack, "solo", database_url=through(proxy, postgres), mode="http", lease_ttl=10.0
    )
    ledger = await Ledger.open(postgres.url)
    try:
        await slash(bot, slack, f"deploy poc {short}")
        record = await wait_step_running(ledger, "sync", bot)
        proxy.cut()
        await asyncio.sleep(3)
        proxy.restore()
        final = await settled(
            ledger,
            sandbox,
            slack,
            record.id,
            gitops_before=before,
            pushed=True,
            state=DeployState.SUCCEEDED,
            live=(bot,),
        )
        assert final.owner == record.owner  # nobody took over, not even itself
        assert final.epoch == record.epoch
        assert sync_count(sandbox) == 1
        text = "\n".join(m.text for m in slack.thread(DEFAULT_CHANNEL, final.thread_ts or ""))
        assert "took over" not in text
    finally:
        await ledger.close()


async def test_a_long_ledger_outage_with_one_bot_still_ends_the_deploy(
    slow_sandbox: Sandbox,
    slack_sandbox: FakeSlack,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
    proxy: TcpProxy,
    bots: list[BotProcess],
) -> None:
    sandbox, slack = slow_sandbox, slack_sandbox
    assert sandbox.git is not None
    short = await push_head(sandbox)
    before = remote_head(sandbox.git.gitops.path)
    bot = await launch(bots, sandbox, slack, "solo", database_url=through(proxy, postgres), mode="http")
    ledger = await Ledger.open(postgres.url)
    try:
        await slash(bot, slack, f"deploy poc {short}")
        record = await wait_step_running(ledger, "rollout", bot)
        proxy.cut()
        await asyncio.sleep(2.5 * TTL)  # the lease lapses: the bot must stop, then heal its own deploy
        proxy.restore()
        final = await settled(
            ledger,
            sandbox,
            slack,
            record.id,
            gitops_before=before,
            pushed=True,
            state=DeployState.SUCCEEDED,
            live=(bot,),
        )
        assert final.epoch is not None and record.epoch is not None and final.epoch > record.epoch
        await wait_thread(slack, final.thread_ts or "", "resuming at sync")
    finally:
        await ledger.close()


# ---- SQLite on a full disk --------------------------------------------------------------------------


async def test_sqlite_disk_full_during_the_rollout_the_deploy_still_ends(
    slow_sandbox: Sandbox, slack_sandbox: FakeSlack, bots: list[BotProcess]
) -> None:
    sandbox, slack = slow_sandbox, slack_sandbox
    assert sandbox.git is not None
    short = await push_head(sandbox)
    before = remote_head(sandbox.git.gitops.path)
    with small_disk(sandbox.root / "ledger-disk") as disk:
        url = f"sqlite+aiosqlite:///{disk / 'ledger.db'}"
        bot = await launch(bots, sandbox, slack, "solo", database_url=url, mode="http")
        ledger = await Ledger.open(url)
        try:
            await slash(bot, slack, f"deploy poc {short}")
            record = await wait_step_running(ledger, "sync", bot)
            filler = await asyncio.to_thread(fill, disk)
            await asyncio.sleep(2 * TTL)
            filler.unlink()
            final = await settled(
                ledger,
                sandbox,
                slack,
                record.id,
                gitops_before=before,
                pushed=True,
                state=DeployState.SUCCEEDED,
                live=(bot,),
            )
            assert final.message == "deployed"
        finally:
            await ledger.close()
            await bot.kill()


# ---- SIGTERM: a rolling update of the bot hands the deploy over ---------------------------------------


async def test_sigterm_mid_rollout_hands_over_and_the_successor_finishes_without_pushing_again(
    slow_sandbox: Sandbox,
    slack_sandbox: FakeSlack,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
    bots: list[BotProcess],
) -> None:
    sandbox, slack = slow_sandbox, slack_sandbox
    assert sandbox.git is not None
    short = await push_head(sandbox)
    before = remote_head(sandbox.git.gitops.path)
    old = await launch(bots, sandbox, slack, "old", database_url=postgres.url, mode="http")
    new = await launch(bots, sandbox, slack, "new", database_url=postgres.url, mode="http")
    ledger = await Ledger.open(postgres.url)
    try:
        await slash(old, slack, f"deploy poc {short}")
        record = await wait_step_running(ledger, "rollout", old)
        assert await old.stop() == 0, old.tail()  # within its grace, not killed
        final = await settled(
            ledger,
            sandbox,
            slack,
            record.id,
            gitops_before=before,
            pushed=True,
            state=DeployState.SUCCEEDED,
            live=(
                old,
                new,
            ),
        )
        assert final.owner != record.owner
        text = await wait_thread(slack, final.thread_ts or "", "handed over at rollout", "resuming at sync")
        assert "cancelled" not in text.lower(), text
    finally:
        await ledger.close()


# ---- Cancel clicked on either replica ---------------------------------------


async def test_cancel_on_the_other_replica_before_and_after_the_push(
    slow_sandbox: Sandbox,
    slack_sandbox: FakeSlack,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
    bots: list[BotProcess],
) -> None:
    sandbox, slack = slow_sandbox, slack_sandbox
    assert sandbox.git is not None
    short = await push_head(sandbox)
    runner = await launch(bots, sandbox, slack, "runner", database_url=postgres.url, mode="http")
    clicked = await launch(bots, sandbox, slack, "clicked", database_url=postgres.url, mode="http")
    ledger = await Ledger.open(postgres.url)
    try:
        # ---- before the push: held at preflight by a hung registry, cancelled through the other replica
        before = remote_head(sandbox.git.gitops.path)
        with frozen(sandbox.registries["poc"].pid):
            await slash(runner, slack, f"deploy poc {short}", user="U0BOB")
            await until("a deploy record", lambda: newest(ledger), runner)
            record = await newest(ledger)
            assert record is not None
            await until("the root message", lambda: ledger_thread(ledger, record.id), runner)
            record = await ledger.get_deploy(record.id)
            await click(clicked, slack, record, "cancel", "U0CAROL")  # a poc deployer, not the requester
            final = await settled(
                ledger,
                sandbox,
                slack,
                record.id,
                gitops_before=before,
                pushed=False,
                state=DeployState.CANCELLED,
                live=(
                    runner,
                    clicked,
                ),
            )
        assert final.cancel_requested_by == "U0CAROL"
        assert final.message is not None
        assert final.message.startswith("cancelled by <@U0CAROL> at "), final.message
        assert final.message.endswith("nothing was pushed"), final.message
        root = slack.message(DEFAULT_CHANNEL, final.thread_ts or "")
        assert [b.get("action_id") for b in root.buttons()] == []  # no live Cancel on an ended deploy

        # ---- after the push: mid-rollout; the outcome says where the overlay and the cluster stand
        before = remote_head(sandbox.git.gitops.path)
        await slash(runner, slack, f"deploy poc {short}", user="U0BOB")
        record = await wait_step_running(ledger, "rollout", runner, after=final.id)
        record = await ledger.get_deploy(record.id)
        await click(runner, slack, record, "cancel", "U0BOB")  # this time on the replica running it
        final = await settled(
            ledger,
            sandbox,
            slack,
            record.id,
            gitops_before=before,
            pushed=True,
            state=DeployState.CANCELLED,
            live=(
                runner,
                clicked,
            ),
        )
        assert final.message == (
            f"cancelled by <@U0BOB> after the GitOps push: poc's overlay is at `{short}`, "
            "the cluster was mid-rollout"
        )
        # the root message trades its live Cancel for Roll back: the overlay moved, so there is a way back
        root = slack.message(DEFAULT_CHANNEL, final.thread_ts or "")
        assert [b.get("action_id") for b in root.buttons()] == ["rollback"]
    finally:
        await ledger.close()


async def ledger_thread(ledger: Ledger, deploy_id: str) -> bool:
    return bool((await ledger.get_deploy(deploy_id)).thread_ts)
