"""A model test of the fencing rules: two bots, one deploy, random interleavings against the real ledger.

Each bot follows the protocol the service follows (claim the deploy, take the lease, prove before a side
effect, write as the owner) while hypothesis interleaves their steps with clock jumps that make leases
lapse. Whatever the order, no two side effects happen at one epoch, and no write by a bot that was
fenced out is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bot.ledger import DeployKind, DeployState, Fence, Fenced, Lease, Ledger, LockHeld, StateConflict

T = TypeVar("T")
# Each example opens a real SQLite ledger: on a loaded machine 20 of them can pass the 120 s default.
pytestmark = pytest.mark.timeout(400)
TTL = 30.0
# Three incarnations, two identities: a1 and a2 are the same bot before and after a restart (a paused
# process may wake up after its successor started), b is another replica.
IDENTITY = {"a1": "bot-a", "a2": "bot-a", "b": "bot-b"}
BOTS = tuple(IDENTITY)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class Bot:
    def __init__(self, name: str) -> None:
        self.name = IDENTITY[name]
        self.fence: Fence | None = None
        self.lease: Lease | None = None


class TwoBots(RuleBasedStateMachine):
    """Bots a and b race for deploy `d` on env poc; the ledger is the only thing they share."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.bots = {name: Bot(name) for name in BOTS}
        self.effects: list[tuple[str, int, int]] = []  # (bot, deploy epoch, lease epoch)
        self.accepted_writes: list[tuple[str, int]] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @initialize()
    def open_ledger(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lease-model-"))
        url = f"sqlite+aiosqlite:///{self.dir / 'ledger.db'}"
        self.ledger = self.run(Ledger.open(url, clock=self.clock))
        self.env = "poc"
        record = self.run(
            self.ledger.create_deploy(
                kind=DeployKind.DEPLOY,
                envs=[self.env],
                ref="abc1234",
                requester="U0ALICE",
                state=DeployState.RUNNING,
            )
        )
        self.deploy_id = record.id

    def teardown(self) -> None:
        if hasattr(self, "ledger"):
            self.run(self.ledger.close())
            shutil.rmtree(self.dir, ignore_errors=True)
        self.loop.close()

    # ---- what a bot does ----

    @rule(name=st.sampled_from(BOTS))
    def take_over(self, name: str) -> None:
        """Claim the deploy (as recovery or a new run does) at the next epoch, then take its lease."""
        bot = self.bots[name]
        current = self.run(self.ledger.get_deploy(self.deploy_id))
        lease = self.run(self.ledger.get_lease(self.env))
        if lease is not None and lease.expires_at > self.clock.now and lease.holder != bot.name:
            return  # recovery leaves a deploy alone while its owner's lease is live
        try:
            claimed = self.run(self.ledger.claim_deploy(self.deploy_id, owner=bot.name, expect=current.fence))
        except (Fenced, StateConflict):
            return
        bot.fence = claimed.fence
        bot.lease = None
        with contextlib.suppress(LockHeld):  # someone else's live lease: this bot holds nothing
            bot.lease = self.run(
                self.ledger.acquire_lease(self.env, holder=bot.name, deploy_id=self.deploy_id, ttl=TTL)
            )

    def _holding(self) -> list[str]:
        return [n for n, b in self.bots.items() if b.fence is not None and b.lease is not None]

    @precondition(lambda self: bool(self._holding()))
    @rule(data=st.data())
    def side_effect(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._holding()))
        """A push, a Job, a sync request: only after a proof."""
        bot = self.bots[name]
        if bot.fence is None or bot.lease is None:
            return
        try:
            self.run(self.ledger.prove(self.deploy_id, bot.fence, [bot.lease], ttl=TTL))
        except Fenced:
            return
        self.effects.append((name, bot.fence.epoch, bot.lease.epoch))

    @precondition(lambda self: bool(self._holding()))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._holding()))
        bot = self.bots[name]
        if bot.fence is None:
            return
        try:
            self.run(self.ledger.update_deploy(self.deploy_id, fence=bot.fence, message=f"by {name}"))
        except Fenced:
            return
        self.accepted_writes.append((name, bot.fence.epoch))

    @precondition(lambda self: bool(self._holding()))
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._holding()))
        bot = self.bots[name]
        if bot.lease is not None:
            self.run(self.ledger.heartbeat(self.env, bot.name, TTL, epoch=bot.lease.epoch))

    @precondition(lambda self: hasattr(self, "ledger"))
    @rule(seconds=st.sampled_from([10.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += timedelta(seconds=seconds)

    # ---- what must hold ----

    @invariant()
    def one_bot_per_epoch(self) -> None:
        # The fencing token is the pair (deploy epoch, lease epoch): a restarted bot that renews its own live
        # lease keeps the lease epoch but claims the next deploy epoch, which fences out its old self.
        by_epoch: dict[int, set[str]] = {}
        for name, deploy_epoch, _ in self.effects:
            by_epoch.setdefault(deploy_epoch, set()).add(name)
        assert all(len(v) == 1 for v in by_epoch.values()), self.effects

    @invariant()
    def effects_never_go_back(self) -> None:
        epochs = [(d, le) for _, d, le in self.effects]
        assert epochs == sorted(epochs), self.effects

    @invariant()
    def no_stale_write(self) -> None:
        # A write is accepted only at the deploy's epoch of its time: epochs of accepted writes never go back
        # and each epoch has one writer.
        writers: dict[int, set[str]] = {}
        for name, epoch in self.accepted_writes:
            writers.setdefault(epoch, set()).add(name)
        assert all(len(v) == 1 for v in writers.values()), self.accepted_writes
        epochs = [e for _, e in self.accepted_writes]
        assert epochs == sorted(epochs), self.accepted_writes


TwoBots.TestCase.settings = settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
test_two_bots_never_act_at_one_epoch = TwoBots.TestCase
