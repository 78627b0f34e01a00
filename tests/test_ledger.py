"""The ledger against real SQLite files and a real PostgreSQL: schema upgrades, lease races, locks, approvals, history."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from bot.errors import ConfigError, PermanentError, TransientError
from bot.ledger import (
    BOT_USER,
    AlreadyDecided,
    ApprovalExpired,
    ApprovalState,
    ApprovalVoid,
    Decision,
    DeployKind,
    DeployState,
    Fenced,
    Lease,
    Ledger,
    LockHeld,
    NoApproval,
    SchemaTooNew,
    StateConflict,
    StepState,
    UnknownDeploy,
)
from bot.ledger import schema as ledger_schema
from tests.testbed.ledgerdb import lock_events
from tests.testbed.pg import ThrowawayPostgres, pg_database  # noqa: F401 - pg_database is a fixture

START = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


class FakeClock:
    """Injectable ledger clock: time moves only when a test says so."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/ledger.db"
    db: ThrowawayPostgres = request.getfixturevalue("pg_database")
    await db.reset()
    return db.url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def ledger(db_url: str, clock: FakeClock) -> AsyncIterator[Ledger]:
    led = await Ledger.open(db_url, clock=clock)
    yield led
    await led.close()


@pytest.fixture
async def other(db_url: str, clock: FakeClock, ledger: Ledger) -> AsyncIterator[Ledger]:
    """A second Ledger on the same database: another bot process."""
    led = await Ledger.open(db_url, clock=clock)
    yield led
    await led.close()


async def _deploy(led: Ledger, env: str = "poc", short: str = "e7e79eb", requester: str = "U0REQ", **kw):
    return await led.create_deploy(
        kind=kw.pop("kind", DeployKind.DEPLOY),
        envs=kw.pop("envs", [env]),
        ref=kw.pop("ref", short),
        sha=short + "0" * 33,
        short=short,
        requester=requester,
        **kw,
    )


# ---- schema ----


async def test_fresh_database_gets_the_latest_schema(ledger: Ledger, db_url: str) -> None:
    assert await ledger.schema_version() == ledger_schema.LATEST
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(ledger_schema.schema_version.c.version))).scalars().all()
    finally:
        await engine.dispose()
    assert sorted(rows) == list(range(1, ledger_schema.LATEST + 1))


async def test_v1_database_is_upgraded_in_place_and_keeps_its_history(db_url: str, clock: FakeClock) -> None:
    # An old bot left a v1 database: deploys with only an env list, no owner/last_step, no approvals.
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            applied = await conn.run_sync(lambda c: ledger_schema.upgrade(c, target=1, now=START))
            assert applied == [1]
            insert = text(
                "INSERT INTO deploys (id, kind, envs, ref, sha, short, requester, state, created_at, "
                "updated_at, finished_at) VALUES (:id, :kind, :envs, :ref, :sha, :short, 'U0OLD', "
                "'succeeded', :at, :at, :at)"
            )
            for i, (did, kind, envs, short) in enumerate(
                [
                    ("d-old001", "deploy", '["staging", "poc"]', "aaaaaaa"),
                    ("d-old002", "migrate", '["staging"]', "bbbbbbb"),
                    ("d-old003", "deploy", '["staging"]', "ccccccc"),
                ]
            ):
                at = START + timedelta(minutes=i)
                if engine.dialect.name == "sqlite":
                    at = at.replace(tzinfo=None)
                await conn.execute(
                    insert,
                    {
                        "id": did,
                        "kind": kind,
                        "envs": envs,
                        "ref": short,
                        "sha": short * 5,
                        "short": short,
                        "at": at,
                    },
                )
        async with engine.connect() as conn:
            cols = await conn.run_sync(lambda c: {x["name"] for x in inspect(c).get_columns("deploys")})
            assert "owner" not in cols
    finally:
        await engine.dispose()

    led = await Ledger.open(db_url, clock=clock)
    try:
        assert await led.schema_version() == ledger_schema.LATEST
        old = await led.get_deploy("d-old001")
        assert old.envs == ("staging", "poc")
        assert old.tags == {"staging": "aaaaaaa", "poc": "aaaaaaa"}
        assert old.owner is None
        assert old.created_at == START
        assert [d.id for d in await led.history("poc")] == ["d-old001"]
        assert [d.id for d in await led.history("staging")] == ["d-old003", "d-old002", "d-old001"]
        assert (await led.get_deploy("d-old002")).tags == {}  # a migration moves no tag
        last = await led.last_succeeded("staging")
        assert last is not None and last.id == "d-old003"
        # the new columns and tables work on the upgraded data
        updated = await led.update_deploy("d-old003", owner="bot-a", last_step="verify")
        assert (updated.owner, updated.last_step) == ("bot-a", "verify")
        fresh = await _deploy(led, "production")
        await led.request_approval(fresh.id, binding="b", requester="U0REQ", expires_at=START)
        await led.lock("staging", "U0OPS", "after the upgrade")
        assert [(x.env, x.user) for x in await led.locks()] == [("staging", "U0OPS")]
        assert await lock_events(db_url, "staging") == [("lock", "U0OPS")]
    finally:
        await led.close()
    # opening again is a no-op: the steps ran once
    led = await Ledger.open(db_url, clock=clock)
    try:
        assert len(await led.history("staging")) == 3
    finally:
        await led.close()


async def test_upgrade_steps_are_idempotent(db_url: str, clock: FakeClock) -> None:
    led = await Ledger.open(db_url, clock=clock)
    try:
        await _deploy(led, "staging")
        await led.lock("staging", "U0OPS", "before the re-run")
        before = (await led.history("staging"), await led.locks())
    finally:
        await led.close()
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            # a step interrupted before its version row was written must be safe to run again
            for step in ledger_schema.STEPS:
                await conn.run_sync(step)
    finally:
        await engine.dispose()
    led = await Ledger.open(db_url, clock=clock)
    try:
        assert await led.schema_version() == ledger_schema.LATEST
        assert (await led.history("staging"), await led.locks()) == before
    finally:
        await led.close()


async def test_processes_opening_together_upgrade_once(db_url: str, clock: FakeClock) -> None:
    ledgers = await asyncio.gather(*(Ledger.open(db_url, clock=clock) for _ in range(3)))
    try:
        for led in ledgers:
            assert await led.schema_version() == ledger_schema.LATEST
        d = await _deploy(ledgers[0])
        assert (await ledgers[2].get_deploy(d.id)).id == d.id
    finally:
        for led in ledgers:
            await led.close()


async def test_a_newer_schema_is_refused(ledger: Ledger, db_url: str, clock: FakeClock) -> None:
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                ledger_schema.schema_version.insert().values(
                    version=99, description="future", applied_at=START
                )
            )
    finally:
        await engine.dispose()
    with pytest.raises(SchemaTooNew, match="version 99"):
        await Ledger.open(db_url, clock=clock)


# ---- deploy records, steps, history ----


async def test_deploy_record_round_trip(ledger: Ledger, clock: FakeClock) -> None:
    d = await ledger.create_deploy(
        kind="deploy",
        envs=["staging", "poc"],
        ref="e7e79eb",
        sha="e7e79eb" + "1" * 33,
        short="e7e79eb",
        requester="U0REQ",
        plan={"images": [{"env": "poc", "digest": "sha256:abc"}]},
        channel="C0DEPLOY",
        thread_ts="1717243200.000100",
        owner="bot-a",
        previous_tags={"staging": "1111111"},
    )
    assert d.id.startswith("d-") and len(d.id) == 8
    assert d.state is DeployState.PLANNED and d.kind is DeployKind.DEPLOY
    assert d.tags == {"staging": "e7e79eb", "poc": "e7e79eb"}
    assert d.previous_tags == {"staging": "1111111"}
    assert d.created_at == START and d.created_at.tzinfo is UTC
    got = await ledger.get_deploy(d.id)
    assert got == d

    clock.advance(90)
    done = await ledger.update_deploy(d.id, state=DeployState.SUCCEEDED, message="all pods ready")
    assert done.finished_at == START + timedelta(seconds=90)
    assert done.updated_at == done.finished_at
    assert done.message == "all pods ready"
    with pytest.raises(UnknownDeploy, match="no deploy d-nope00"):
        await ledger.get_deploy("d-nope00")
    with pytest.raises(UnknownDeploy):
        await ledger.update_deploy("d-nope00", state=DeployState.FAILED)
    with pytest.raises(TypeError, match="kind"):
        await ledger.update_deploy(d.id, kind="rollback")  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="does not target"):
        await ledger.update_deploy(d.id, tags={"production": "e7e79eb"})


async def test_conditional_update_refuses_a_moved_deploy(ledger: Ledger, other: Ledger) -> None:
    d = await _deploy(ledger, state=DeployState.RUNNING)
    results = await asyncio.gather(
        ledger.update_deploy(d.id, expect_state=DeployState.RUNNING, state=DeployState.INTERRUPTED),
        other.update_deploy(d.id, expect_state=DeployState.RUNNING, state=DeployState.CANCELLED),
        return_exceptions=True,
    )
    conflicts = [r for r in results if isinstance(r, StateConflict)]
    assert len(conflicts) == 1, results
    final = await ledger.get_deploy(d.id)
    assert final.state in (DeployState.INTERRUPTED, DeployState.CANCELLED)
    assert final.state.value in str(conflicts[0])


async def test_steps_are_recorded_and_move_last_step(ledger: Ledger, clock: FakeClock) -> None:
    d = await _deploy(ledger, state=DeployState.RUNNING)
    await ledger.record_step(d.id, "resolve")
    clock.advance(1)
    await ledger.finish_step(d.id, "resolve", state=StepState.OK, detail={"short": "e7e79eb"})
    await ledger.record_step(d.id, "migrate", env="poc", state=StepState.SKIPPED, detail={"why": "no change"})
    await ledger.record_step(d.id, "images", env="poc")
    clock.advance(2)
    await ledger.finish_step(d.id, "images", env="poc", state=StepState.ERRORED, detail={"error": "timeout"})
    # a retry of the same step is a new attempt
    await ledger.record_step(d.id, "images", env="poc")
    await ledger.finish_step(d.id, "images", env="poc", state=StepState.OK)

    steps = await ledger.steps(d.id)
    assert [(x.step, x.env, x.state) for x in steps] == [
        ("resolve", None, StepState.OK),
        ("migrate", "poc", StepState.SKIPPED),
        ("images", "poc", StepState.ERRORED),
        ("images", "poc", StepState.OK),
    ]
    assert steps[0].detail == {"short": "e7e79eb"}
    assert steps[0].finished_at == START + timedelta(seconds=1)
    assert steps[2].detail == {"error": "timeout"}
    assert (await ledger.get_deploy(d.id)).last_step == "images"

    # an errored step does not count as completed
    await ledger.record_step(d.id, "gitops", env="poc")
    await ledger.finish_step(d.id, "gitops", env="poc", state=StepState.FAILED)
    assert (await ledger.get_deploy(d.id)).last_step == "images"
    # a step finished without being started is still recorded
    fin = await ledger.finish_step(d.id, "verify", env="poc", state=StepState.SKIPPED)
    assert fin.started_at == fin.finished_at
    with pytest.raises(UnknownDeploy):
        await ledger.record_step("d-nope00", "resolve")
    with pytest.raises(ValueError, match="final state"):
        await ledger.finish_step(d.id, "verify", state=StepState.RUNNING)


async def test_history_is_newest_first_and_filters_by_env(ledger: Ledger, clock: FakeClock) -> None:
    ids = []
    for env, envs in [("poc", None), ("staging", None), ("x", ["staging", "poc"]), ("production", None)]:
        d = await _deploy(ledger, env, envs=envs or [env])
        ids.append(d.id)
        clock.advance(10)
    # same timestamp: insertion order breaks the tie
    same = await _deploy(ledger, "poc")
    ids.append(same.id)
    again = await _deploy(ledger, "poc")
    ids.append(again.id)

    assert [d.id for d in await ledger.history()] == ids[::-1]
    assert [d.id for d in await ledger.history(limit=2)] == [again.id, same.id]
    assert [d.id for d in await ledger.history("poc")] == [again.id, same.id, ids[2], ids[0]]
    assert [d.id for d in await ledger.history("staging")] == [ids[2], ids[1]]
    assert [d.id for d in await ledger.history("production")] == [ids[3]]
    assert await ledger.history("nowhere") == []


async def test_history_pages_follow_the_before_cursor_to_the_oldest(ledger: Ledger, clock: FakeClock) -> None:
    ids = []
    for i in range(7):
        d = await _deploy(ledger, "poc" if i % 2 else "staging")
        ids.append(d.id)
        if i != 3:  # two deploys in the same instant: the cursor still splits them in insertion order
            clock.advance(5)
    newest_first = ids[::-1]

    seen: list[str] = []
    before = None
    pages = 0
    while True:
        page, more = await ledger.history_page(limit=3, before=before)
        seen += [d.id for d in page]
        pages += 1
        if not more:
            break
        before = page[-1].id
    assert seen == newest_first
    assert pages == 3  # 3 + 3 + 1, and the last page says there is nothing older
    # a page that ends exactly at the oldest record says so too
    page, more = await ledger.history_page(limit=7)
    assert (len(page), more) == (7, False)
    # per env: the cursor may be any deploy id, even one of another env
    poc = [i for n, i in enumerate(ids) if n % 2][::-1]
    page, more = await ledger.history_page("poc", 2)
    assert ([d.id for d in page], more) == (poc[:2], True)
    assert [d.id for d in await ledger.history("poc", 10, before=page[-1].id)] == poc[2:]
    assert [d.id for d in await ledger.history("poc", 10, before=ids[4])] == [ids[3], ids[1]]
    with pytest.raises(UnknownDeploy, match="d-nope00"):
        await ledger.history_page(before="d-nope00")


async def test_pruning_removes_old_steps_of_finished_deploys_and_keeps_every_record(
    ledger: Ledger, clock: FakeClock
) -> None:
    old = await _deploy(ledger, "poc", state=DeployState.RUNNING)
    for step in ("resolve", "images", "verify"):
        await ledger.record_step(old.id, step)
        await ledger.finish_step(old.id, step, state=StepState.OK)
    await ledger.update_deploy(old.id, state=DeployState.SUCCEEDED)
    # still running from back then (a long approval wait, a bot gone): its steps are not history yet
    stuck = await _deploy(ledger, "staging", state=DeployState.RUNNING)
    await ledger.record_step(stuck.id, "images")
    await ledger.finish_step(stuck.id, "images", state=StepState.OK)
    clock.advance(40 * 86400)
    recent = await _deploy(ledger, "poc", state=DeployState.RUNNING)
    await ledger.record_step(recent.id, "resolve")
    await ledger.finish_step(recent.id, "resolve", state=StepState.OK)
    await ledger.update_deploy(recent.id, state=DeployState.FAILED)

    assert await ledger.prune_steps(30, batch=2) == 3  # in two batches
    assert await ledger.steps(old.id) == []
    assert [x.step for x in await ledger.steps(stuck.id)] == ["images"]
    assert [x.step for x in await ledger.steps(recent.id)] == ["resolve"]
    # the records stay, whole: history, the tags a rollback needs, the last step
    kept = await ledger.get_deploy(old.id)
    assert (kept.state, kept.tags, kept.last_step) == (DeployState.SUCCEEDED, {"poc": "e7e79eb"}, "verify")
    assert {d.id for d in await ledger.history()} == {old.id, stuck.id, recent.id}
    assert await ledger.prune_steps(30) == 0  # nothing left to do
    with pytest.raises(ValueError, match="positive"):
        await ledger.prune_steps(0)


async def test_v7_indexes_serve_history_and_pruning(ledger: Ledger, db_url: str) -> None:
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:

            def names(c, table: str) -> set[str]:  # type: ignore[no-untyped-def]
                return {i["name"] for i in inspect(c).get_indexes(table)}

            deploys = await conn.run_sync(names, "deploys")
            targets = await conn.run_sync(names, "deploy_targets")
            steps = await conn.run_sync(names, "deploy_steps")
            approvals = await conn.run_sync(names, "approvals")
    finally:
        await engine.dispose()
    assert {"ix_deploys_created_seq", "ix_deploys_state_finished"} <= deploys
    assert not {"ix_deploys_created", "ix_deploys_state"} & deploys  # superseded by the wider ones
    assert "ix_deploy_targets_env_deploy" in targets and "ix_deploy_targets_env" not in targets
    assert "ix_deploy_steps_finished" in steps
    assert "ix_approvals_due" in approvals


async def test_in_flight_after_a_crash(db_url: str, clock: FakeClock) -> None:
    crashed = await Ledger.open(db_url, clock=clock)
    running = await _deploy(crashed, "staging", state=DeployState.RUNNING, owner="bot-a")
    waiting = await _deploy(crashed, "production", state=DeployState.AWAITING_APPROVAL, owner="bot-a")
    done = await _deploy(crashed, "poc", state=DeployState.RUNNING, owner="bot-a")
    await crashed.update_deploy(done.id, state=DeployState.SUCCEEDED)
    await crashed.acquire_lease("staging", holder="bot-a", deploy_id=running.id, ttl=30)
    await crashed.record_step(running.id, "images", env="staging")
    await crashed.finish_step(running.id, "images", env="staging", state=StepState.OK)
    await crashed.record_step(running.id, "gitops", env="staging")
    await crashed.close()  # the process dies here: no release, no final state

    clock.advance(45)
    restarted = await Ledger.open(db_url, clock=clock)
    try:
        flying = await restarted.in_flight()
        assert {d.id for d in flying} == {running.id, waiting.id}
        assert {d.id for d in await restarted.in_flight(owner="bot-a")} == {running.id, waiting.id}
        assert await restarted.in_flight(owner="bot-b") == []
        rec = next(d for d in flying if d.id == running.id)
        assert rec.last_step == "images"
        assert (await restarted.steps(running.id))[-1].state is StepState.RUNNING

        lapsed = await restarted.get_lease("staging")
        assert lapsed is not None and lapsed.deploy_id == running.id
        assert lapsed.expires_at <= clock.now  # its holder stopped proving: a candidate for takeover
        await restarted.update_deploy(
            running.id,
            expect_state=DeployState.RUNNING,
            state=DeployState.INTERRUPTED,
            message="the bot restarted during gitops",
        )
        assert [d.id for d in await restarted.in_flight()] == [waiting.id]
        taken = await restarted.acquire_lease("staging", holder="bot-b", deploy_id="d-next00", ttl=30)
        assert taken.taken_over_from == running.id
    finally:
        await restarted.close()


async def test_last_succeeded_is_the_deploy_that_put_the_current_tag_in_place(
    ledger: Ledger, clock: FakeClock
) -> None:
    async def finished(
        short: str, state: DeployState, kind: DeployKind = DeployKind.DEPLOY, env: str = "staging"
    ):
        d = await _deploy(ledger, env, short=short, kind=kind, state=DeployState.RUNNING)
        clock.advance(60)
        return await ledger.update_deploy(d.id, state=state)

    assert await ledger.last_succeeded("staging") is None
    a = await finished("aaaaaaa", DeployState.SUCCEEDED)
    assert (await ledger.last_succeeded("staging")) == a
    await finished("bbbbbbb", DeployState.FAILED)
    assert (await ledger.last_succeeded("staging")) == a
    c = await finished("ccccccc", DeployState.SUCCEEDED)
    await finished("ddddddd", DeployState.SUCCEEDED, kind=DeployKind.MIGRATE)
    await finished("eeeeeee", DeployState.SUCCEEDED, env="poc")
    c_again = await finished("ccccccc", DeployState.SUCCEEDED)  # re-deploy of the same tag

    last = await ledger.last_succeeded("staging")
    assert last is not None and last.id == c_again.id and c.id != c_again.id
    assert last.tags == {"staging": "ccccccc"}

    rb = await finished("aaaaaaa", DeployState.SUCCEEDED, kind=DeployKind.ROLLBACK)
    last = await ledger.last_succeeded("staging")
    assert last is not None and last.id == rb.id and last.tags == {"staging": "aaaaaaa"}


# ---- leases ----


async def test_two_processes_race_for_a_lease_and_exactly_one_wins(
    ledger: Ledger, other: Ledger, clock: FakeClock
) -> None:
    for round_ in range(4):
        a = await _deploy(ledger, "production", requester="U0ALICE", short="aaaaaaa")
        b = await _deploy(other, "production", requester="U0BOB", short="bbbbbbb")
        results = await asyncio.gather(
            ledger.acquire_lease("production", holder="bot-a", deploy_id=a.id, ttl=60),
            other.acquire_lease("production", holder="bot-b", deploy_id=b.id, ttl=60),
            return_exceptions=True,
        )
        wins = [r for r in results if isinstance(r, Lease)]
        losses = [r for r in results if isinstance(r, LockHeld)]
        assert len(wins) == 1 and len(losses) == 1, results
        win, loss = wins[0], losses[0]
        winner = a if win.deploy_id == a.id else b
        msg = str(loss)
        assert isinstance(loss, PermanentError)
        assert loss.kind == "lease" and loss.deploy_id == winner.id and loss.user == winner.requester
        assert f"deploy {winner.id}" in msg
        assert f"<@{winner.requester}>" in msg
        assert f"deploy of {winner.short}" in msg
        assert "since 2025-06-01 12:" in msg
        assert loss.since == win.acquired_at
        released = await (ledger if win.holder == "bot-a" else other).release_lease("production", win.holder)
        assert released, round_
        clock.advance(1)


async def test_different_envs_lease_in_parallel(ledger: Ledger, other: Ledger) -> None:
    ds = [await _deploy(ledger, env) for env in ("production", "staging", "poc")]
    leases = await asyncio.gather(
        ledger.acquire_lease("production", holder="bot-a", deploy_id=ds[0].id, ttl=60),
        other.acquire_lease("staging", holder="bot-b", deploy_id=ds[1].id, ttl=60),
        ledger.acquire_lease("poc", holder="bot-a", deploy_id=ds[2].id, ttl=60),
    )
    assert [x.env for x in leases] == ["production", "staging", "poc"]
    assert [x.env for x in await other.leases()] == ["poc", "production", "staging"]


async def test_a_lapsed_lease_is_taken_over(ledger: Ledger, other: Ledger, clock: FakeClock) -> None:
    a = await _deploy(ledger, "staging", owner="bot-a")
    b = await _deploy(other, "staging")
    assert a.fence is not None
    first = await ledger.acquire_lease("staging", holder="bot-a", deploy_id=a.id, ttl=30)
    assert first.expires_at == START + timedelta(seconds=30) and first.taken_over_from is None
    clock.advance(29)
    assert await other.get_lease("staging") == first  # still live
    with pytest.raises(LockHeld):
        await other.acquire_lease("staging", holder="bot-b", deploy_id=b.id, ttl=30)
    clock.advance(2)
    lapsed = await other.get_lease("staging")
    assert lapsed is not None and lapsed.deploy_id == a.id and lapsed.expires_at < clock.now
    taken = await other.acquire_lease("staging", holder="bot-b", deploy_id=b.id, ttl=30)
    assert (taken.holder, taken.deploy_id, taken.taken_over_from) == ("bot-b", b.id, a.id)
    assert taken.acquired_at == clock.now
    assert (first.epoch, taken.epoch) == (1, 2)  # the take-over moved the env's fencing token on
    # the crashed holder learns it lost the lease, and cannot release the new holder's
    with pytest.raises(Fenced):
        await ledger.prove(a.id, a.fence, [first], ttl=30)
    assert await ledger.release_lease("staging", "bot-a") is False
    assert (await ledger.get_lease("staging")) == Lease(
        env="staging",
        holder="bot-b",
        deploy_id=b.id,
        acquired_at=clock.now,
        expires_at=clock.now + timedelta(seconds=30),
        heartbeat_at=clock.now,
        epoch=2,
    )


async def test_proving_keeps_the_lease(ledger: Ledger, other: Ledger, clock: FakeClock) -> None:
    a = await _deploy(ledger, "poc", owner="bot-a")
    b = await _deploy(other, "poc", owner="bot-b")
    assert a.fence is not None and b.fence is not None
    held_lease = await ledger.acquire_lease("poc", holder="bot-a", deploy_id=a.id, ttl=30)
    for _ in range(4):
        clock.advance(20)
        renewed = await ledger.prove(a.id, a.fence, [held_lease], ttl=30)
        assert renewed == clock.now + timedelta(seconds=30)
    clock.advance(20)  # 100 s after acquiring, far past the first ttl
    with pytest.raises(LockHeld) as held:
        await other.acquire_lease("poc", holder="bot-b", deploy_id=b.id, ttl=30)
    assert held.value.since == START  # held since the start, renewed since
    lease = await other.get_lease("poc")
    assert lease is not None and lease.heartbeat_at == START + timedelta(seconds=80)
    with pytest.raises(Fenced):  # not the holder
        await other.prove(b.id, b.fence, [held_lease], ttl=30)
    clock.advance(11)  # proofs stopped: lapsed now
    with pytest.raises(Fenced):
        await ledger.prove(a.id, a.fence, [held_lease], ttl=30)


async def test_same_holder_renews_but_cannot_run_two_deploys_on_one_env(
    ledger: Ledger, clock: FakeClock
) -> None:
    a = await _deploy(ledger, "poc")
    b = await _deploy(ledger, "poc")
    await ledger.acquire_lease("poc", holder="bot-a", deploy_id=a.id, ttl=30)
    clock.advance(10)
    again = await ledger.acquire_lease("poc", holder="bot-a", deploy_id=a.id, ttl=30)
    assert again.acquired_at == START and again.expires_at == clock.now + timedelta(seconds=30)
    assert again.taken_over_from is None
    with pytest.raises(LockHeld, match=a.id):
        await ledger.acquire_lease("poc", holder="bot-a", deploy_id=b.id, ttl=30)
    assert await ledger.release_lease("poc", "bot-a") is True
    assert (await ledger.acquire_lease("poc", holder="bot-a", deploy_id=b.id, ttl=30)).deploy_id == b.id


# ---- manual locks ----


async def test_manual_lock_refuses_leases_until_unlocked(
    ledger: Ledger, other: Ledger, clock: FakeClock, db_url: str
) -> None:
    d = await _deploy(ledger, "production")
    lock = await ledger.lock("production", "U0OPS", "ClickHouse maintenance until 14:00")
    assert (lock.user, lock.since) == ("U0OPS", START)
    clock.advance(300)
    with pytest.raises(LockHeld) as held:
        await other.acquire_lease("production", holder="bot-b", deploy_id=d.id, ttl=60)
    err = held.value
    assert (err.kind, err.user, err.reason, err.since) == (
        "manual",
        "U0OPS",
        "ClickHouse maintenance until 14:00",
        START,
    )
    assert str(err).startswith(
        "production is locked by <@U0OPS> since 2025-06-01 12:00 UTC (5 min ago): ClickHouse maintenance until 14:00"
    )
    assert "unlock production" in str(err)
    # somebody else cannot take the lock over; the same person can change the reason
    with pytest.raises(LockHeld, match="<@U0OPS>"):
        await other.lock("production", "U0OTHER", "mine now")
    updated = await ledger.lock("production", "U0OPS", "maintenance, extended")
    assert (updated.reason, updated.since) == ("maintenance, extended", START)
    assert [(x.env, x.user) for x in await other.locks()] == [("production", "U0OPS")]

    removed = await other.unlock("production", "U0ADMIN")
    assert removed is not None and removed.reason == "maintenance, extended"
    assert await other.unlock("production", "U0ADMIN") is None
    assert await ledger.locks() == []
    lease = await other.acquire_lease("production", holder="bot-b", deploy_id=d.id, ttl=60)
    assert lease.deploy_id == d.id
    assert await lock_events(db_url, "production") == [
        ("unlock", "U0ADMIN"),
        ("lock", "U0OPS"),
        ("lock", "U0OPS"),
    ]


async def test_the_bot_locks_production_after_a_failed_deploy(ledger: Ledger, clock: FakeClock) -> None:
    d = await _deploy(ledger, "production", state=DeployState.RUNNING)
    await ledger.acquire_lease("production", holder="bot-a", deploy_id=d.id, ttl=60)
    await ledger.update_deploy(d.id, state=DeployState.FAILED, message="rollout: ImagePullBackOff")
    await ledger.lock(
        "production", BOT_USER, f"deploy {d.id} failed; check the thread before deploying again"
    )
    await ledger.release_lease("production", "bot-a")
    nxt = await _deploy(ledger, "production")
    with pytest.raises(LockHeld) as held:
        await ledger.acquire_lease("production", holder="bot-a", deploy_id=nxt.id, ttl=60)
    assert f"locked by funnelcake-bot since 2025-06-01 12:00 UTC (0 s ago): deploy {d.id} failed" in str(
        held.value
    )
    # the rollback that is the way out may pass the bot's lock, and the lock stays until cleared
    rb = await _deploy(ledger, "production", kind=DeployKind.ROLLBACK)
    lease = await ledger.acquire_lease(
        "production", holder="bot-a", deploy_id=rb.id, ttl=60, ignore_lock_by=BOT_USER
    )
    assert lease.deploy_id == rb.id
    assert [x.user for x in await ledger.locks()] == [BOT_USER]
    await ledger.release_lease("production", "bot-a")
    await ledger.lock("staging", "U0OPS", "freeze")
    with pytest.raises(LockHeld, match="<@U0OPS>"):  # a person's lock is not the bot's
        await ledger.acquire_lease(
            "staging", holder="bot-a", deploy_id=rb.id, ttl=60, ignore_lock_by=BOT_USER
        )


async def test_lock_and_lease_race_matches_a_serial_order(ledger: Ledger, other: Ledger) -> None:
    for env in ("staging", "poc", "production"):
        d = await _deploy(ledger, env)
        leased, locked = await asyncio.gather(
            ledger.acquire_lease(env, holder="bot-a", deploy_id=d.id, ttl=60),
            other.lock(env, "U0OPS", "freeze"),
            return_exceptions=True,
        )
        # The lock always lands. The lease either came first (and may finish its deploy) or saw the lock.
        assert not isinstance(locked, BaseException), locked
        lease = await ledger.get_lease(env)
        if isinstance(leased, LockHeld):
            assert leased.kind == "manual" and lease is None
        else:
            assert isinstance(leased, Lease) and lease is not None and lease.deploy_id == d.id
    assert [x.env for x in await ledger.locks()] == ["poc", "production", "staging"]


# ---- approvals ----


async def _awaiting(led: Ledger, clock: FakeClock, binding: str = "bind-1", ttl: float = 1800):
    d = await _deploy(led, "production", requester="U0REQ")
    ap = await led.request_approval(
        d.id, binding=binding, requester="U0REQ", expires_at=clock.now + timedelta(seconds=ttl)
    )
    assert ap.state is ApprovalState.PENDING
    assert (await led.get_deploy(d.id)).state is DeployState.AWAITING_APPROVAL
    return d


async def test_first_decision_wins_under_concurrency(ledger: Ledger, other: Ledger, clock: FakeClock) -> None:
    for _ in range(3):
        d = await _awaiting(ledger, clock)
        results = await asyncio.gather(
            ledger.decide(d.id, user="U0ANN", decision="approve", binding="bind-1"),
            other.decide(d.id, user="U0DAN", decision="deny", binding="bind-1"),
            return_exceptions=True,
        )
        decisions = [r for r in results if isinstance(r, Decision)]
        already = [r for r in results if isinstance(r, AlreadyDecided)]
        assert len(decisions) == 1 and len(already) == 1, results
        won, lost = decisions[0], already[0]
        assert (lost.by, lost.decision, lost.at) == (won.user, won.decision, clock.now)
        ap = await ledger.get_approval(d.id)
        assert ap is not None and ap.decided_by == won.user
        rec = await ledger.get_deploy(d.id)
        if won.decision == "approve":
            assert ap.state is ApprovalState.APPROVED
            assert rec.approver == "U0ANN" and rec.state is DeployState.AWAITING_APPROVAL
        else:
            assert ap.state is ApprovalState.DENIED
            assert rec.state is DeployState.DENIED and rec.approver is None


async def test_second_click_is_already_decided(ledger: Ledger, clock: FakeClock) -> None:
    d = await _awaiting(ledger, clock)
    clock.advance(60)
    first = await ledger.decide(d.id, user="U0ANN", decision="approve", binding="bind-1")
    assert (first.user, first.decision, first.at) == ("U0ANN", "approve", clock.now)
    clock.advance(5)
    with pytest.raises(AlreadyDecided) as again:
        await ledger.decide(d.id, user="U0ANN", decision="approve", binding="bind-1")
    assert (again.value.by, again.value.decision) == ("U0ANN", "approve")
    assert again.value.at == START + timedelta(seconds=60)
    assert "already approved by <@U0ANN> at 2025-06-01 12:01 UTC" in str(again.value)
    assert (await ledger.get_deploy(d.id)).approver == "U0ANN"
    approved = await ledger.verify_approval(d.id, binding="bind-1")
    assert approved.state is ApprovalState.APPROVED


async def test_an_expired_approval_cannot_be_decided(ledger: Ledger, clock: FakeClock) -> None:
    d = await _awaiting(ledger, clock, ttl=600)
    clock.advance(599)
    assert (await ledger.get_approval(d.id)).state is ApprovalState.PENDING  # type: ignore[union-attr]
    clock.advance(1)
    assert (await ledger.get_approval(d.id)).state is ApprovalState.EXPIRED  # type: ignore[union-attr]
    with pytest.raises(ApprovalExpired, match="expired at 2025-06-01 12:10 UTC"):
        await ledger.decide(d.id, user="U0ANN", decision="approve", binding="bind-1")
    rec = await ledger.get_deploy(d.id)
    assert rec.state is DeployState.EXPIRED and rec.finished_at == clock.now and rec.approver is None
    with pytest.raises(ApprovalExpired):
        await ledger.decide(d.id, user="U0DAN", decision="deny", binding="bind-1", now=clock.now)
    # `now` is the click's time: a click made before the deadline but processed after it still counts
    d2 = await _awaiting(ledger, clock, ttl=10)
    clicked = clock.now + timedelta(seconds=5)
    clock.advance(30)
    assert (
        await ledger.decide(d2.id, user="U0ANN", decision="approve", binding="bind-1", now=clicked)
    ).at == clicked


async def test_the_sweeper_expires_overdue_approvals(ledger: Ledger, clock: FakeClock) -> None:
    short = await _awaiting(ledger, clock, ttl=60)
    long = await _awaiting(ledger, clock, ttl=3600)
    clock.advance(61)
    assert await ledger.expire_approvals() == [short.id]
    assert await ledger.expire_approvals() == []
    assert (await ledger.get_deploy(short.id)).state is DeployState.EXPIRED
    assert (await ledger.get_deploy(long.id)).state is DeployState.AWAITING_APPROVAL


async def test_a_changed_plan_voids_the_approval(ledger: Ledger, clock: FakeClock) -> None:
    d = await _awaiting(ledger, clock, binding="bind-1")
    with pytest.raises(ApprovalVoid, match="changed since the approval was requested"):
        await ledger.decide(d.id, user="U0ANN", decision="approve", binding="bind-2")
    assert (await ledger.get_approval(d.id)).state is ApprovalState.VOID  # type: ignore[union-attr]
    with pytest.raises(ApprovalVoid):  # the old plan's button is dead too
        await ledger.decide(d.id, user="U0ANN", decision="approve", binding="bind-1")
    # the service re-plans and asks again
    await ledger.request_approval(
        d.id, binding="bind-2", requester="U0REQ", expires_at=clock.now + timedelta(hours=1)
    )
    await ledger.decide(d.id, user="U0ANN", decision="approve", binding="bind-2")
    # approved, then the digests moved before the run: the approval no longer applies
    with pytest.raises(ApprovalVoid, match="changed since it was approved"):
        await ledger.verify_approval(d.id, binding="bind-3")
    assert (await ledger.get_approval(d.id)).state is ApprovalState.VOID  # type: ignore[union-attr]
    with pytest.raises(NoApproval, match="void"):
        await ledger.verify_approval(d.id, binding="bind-2")


async def test_a_denial_is_recorded_and_final(ledger: Ledger, clock: FakeClock) -> None:
    d = await _awaiting(ledger, clock)
    clock.advance(30)
    dec = await ledger.decide(d.id, user="U0DAN", decision="deny", binding="bind-1")
    assert dec.decision == "deny"
    ap = await ledger.get_approval(d.id)
    assert ap is not None and (ap.state, ap.decided_by, ap.decided_at) == (
        ApprovalState.DENIED,
        "U0DAN",
        clock.now,
    )
    rec = await ledger.get_deploy(d.id)
    assert (
        rec.state is DeployState.DENIED and rec.finished_at == clock.now and "<@U0DAN>" in (rec.message or "")
    )
    with pytest.raises(AlreadyDecided, match="already denied by <@U0DAN>"):
        await ledger.decide(d.id, user="U0ANN", decision="approve", binding="bind-1")
    with pytest.raises(StateConflict):
        await ledger.request_approval(d.id, binding="bind-1", requester="U0REQ", expires_at=clock.now)
    with pytest.raises(NoApproval, match="denied"):
        await ledger.verify_approval(d.id, binding="bind-1")


async def test_a_cancelled_deploy_cannot_be_approved(ledger: Ledger, clock: FakeClock) -> None:
    d = await _awaiting(ledger, clock)
    await ledger.update_deploy(d.id, state=DeployState.CANCELLED, message="cancelled by <@U0REQ>")
    with pytest.raises(StateConflict, match="is cancelled, not awaiting_approval"):
        await ledger.decide(d.id, user="U0ANN", decision="approve", binding="bind-1")
    ap = await ledger.get_approval(d.id)
    assert ap is not None and ap.state is ApprovalState.PENDING and ap.decided_by is None
    assert (await ledger.get_deploy(d.id)).approver is None


async def test_decide_without_a_request(ledger: Ledger, clock: FakeClock) -> None:
    d = await _deploy(ledger, "production")
    assert await ledger.get_approval(d.id) is None
    with pytest.raises(NoApproval, match="no approval request"):
        await ledger.decide(d.id, user="U0ANN", decision="approve", binding="x")
    with pytest.raises(UnknownDeploy):
        await ledger.request_approval("d-nope00", binding="x", requester="U0REQ", expires_at=clock.now)


# ---- connection problems and configuration ----


async def test_a_busy_database_is_a_transient_error(ledger: Ledger, db_url: str, clock: FakeClock) -> None:
    d = await _deploy(ledger, "poc")
    # Short deadline for this instance only; long enough that a loaded machine still connects in time.
    led = await Ledger.open(db_url, clock=clock, query_timeout=1.5)
    if db_url.startswith("sqlite"):
        holder = sqlite3.connect(db_url.split("///", 1)[1], timeout=0.1)
        holder.execute("BEGIN IMMEDIATE")
        release = holder.rollback
    else:
        pg = await asyncpg.connect(db_url.replace("+asyncpg", ""), timeout=5)
        tr = pg.transaction()
        await tr.start()
        await pg.execute("LOCK TABLE leases IN ACCESS EXCLUSIVE MODE")
    try:
        with pytest.raises(TransientError, match="ledger") as busy:
            await led.acquire_lease("poc", holder="bot-a", deploy_id=d.id, ttl=30)
        assert "SELECT" not in str(busy.value)  # no SQL (or its parameters) in a person's message
    finally:
        if db_url.startswith("sqlite"):
            release()
            holder.close()
        else:
            await tr.rollback()
            await pg.close()
    assert (await led.acquire_lease("poc", holder="bot-a", deploy_id=d.id, ttl=30)).deploy_id == d.id
    await led.close()


async def test_an_unusable_location_is_reported(db_url: str) -> None:
    if db_url.startswith("sqlite"):
        blocker = db_url.split("///", 1)[1] + ".blocker"
        with open(blocker, "w"):  # noqa: ASYNC230 - a regular file where a directory should be
            pass
        with pytest.raises(ConfigError, match="cannot create the ledger's directory"):
            await Ledger.open(f"sqlite:///{blocker}/ledger.db")
    else:
        with pytest.raises(
            TransientError, match=r"\(PostgreSQL 127\.0\.0\.1:1/nowhere\) is unreachable"
        ) as e:
            await Ledger.open("postgresql://postgres:s3cret@127.0.0.1:1/nowhere", query_timeout=2)
        assert "s3cret" not in str(e.value)


async def test_database_url_forms(tmp_path, db_url: str) -> None:
    if db_url.startswith("sqlite"):
        led = await Ledger.open(f"sqlite:///{tmp_path}/sub/dir/ledger.db")
        await led.close()
        assert (tmp_path / "sub" / "dir" / "ledger.db").exists()
    else:
        led = await Ledger.open(db_url.replace("postgresql+asyncpg://", "postgres://"))
        assert await led.schema_version() == ledger_schema.LATEST
        await led.close()
    for bad in ("sqlite://", "sqlite:///:memory:", "mysql://x@y/z", "::not a url::"):
        with pytest.raises(ConfigError):
            await Ledger.open(bad)
