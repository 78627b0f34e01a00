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
# Examples share one real SQLite ledger (each races for its own env and deploy), so hundreds are cheap;
# the bound leaves room for a loaded machine.
pytestmark = pytest.mark.timeout(400)
TTL = 30.0
EXAMPLES = 300
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
        self.deploy_id = ""
        self.fence: Fence | None = None
        self.lease: Lease | None = None


class Shared:
    """One event loop, clock and ledger for every example; each example gets its own env and deploy."""

    loop: asyncio.AbstractEventLoop | None = None
    ledger: Ledger | None = None
    dir: Path | None = None
    clock = Clock()
    examples = 0

    @classmethod
    def open(cls) -> Ledger:
        if cls.ledger is None:
            cls.loop = asyncio.new_event_loop()
            cls.dir = Path(tempfile.mkdtemp(prefix="lease-model-"))
            url = f"sqlite+aiosqlite:///{cls.dir / 'ledger.db'}"
            cls.ledger = cls.loop.run_until_complete(Ledger.open(url, clock=cls.clock))
        return cls.ledger

    @classmethod
    def close(cls) -> None:
        if cls.loop is not None and cls.ledger is not None:
            cls.loop.run_until_complete(cls.ledger.close())
            cls.loop.close()
        if cls.dir is not None:
            shutil.rmtree(cls.dir, ignore_errors=True)
        cls.loop = cls.ledger = cls.dir = None


class TwoBots(RuleBasedStateMachine):
    """Bots race for two deploys of one env; the ledger is the only thing they share."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Shared.open()
        assert Shared.loop is not None
        self.loop = Shared.loop
        self.clock = Shared.clock
        self.bots = {name: Bot(name) for name in BOTS}
        self.effects: list[tuple[str, str, int, int]] = []  # (bot, deploy, deploy epoch, lease epoch)
        self.accepted_writes: list[tuple[str, str, int]] = []  # (bot, deploy, deploy epoch)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @initialize()
    def new_deploys(self) -> None:
        """Two deploys of one env (two people asked at once): the env's lease lets one act at a time."""
        Shared.examples += 1
        self.env = f"env{Shared.examples}"
        self.deploy_ids = [
            self.run(
                self.ledger.create_deploy(
                    kind=DeployKind.DEPLOY,
                    envs=[self.env],
                    ref=ref,
                    requester="U0ALICE",
                    state=DeployState.RUNNING,
                )
            ).id
            for ref in ("abc1234", "def5678")
        ]

    # ---- what a bot does ----

    @precondition(lambda self: hasattr(self, "deploy_ids"))
    @rule(name=st.sampled_from(BOTS), which=st.sampled_from([0, 1]))
    def take_over(self, name: str, which: int) -> None:
        """Claim a deploy (as a new run or recovery does) at the next epoch, then take the env's lease."""
        bot = self.bots[name]
        deploy_id = self.deploy_ids[which]
        current = self.run(self.ledger.get_deploy(deploy_id))
        lease = self.run(self.ledger.get_lease(self.env))
        live = lease is not None and lease.expires_at > self.clock.now
        if live and lease is not None and lease.deploy_id == deploy_id and lease.holder != bot.name:
            return  # recovery leaves a deploy alone while its owner's lease is live
        try:
            claimed = self.run(self.ledger.claim_deploy(deploy_id, owner=bot.name, expect=current.fence))
        except (Fenced, StateConflict):
            return
        bot.deploy_id, bot.fence, bot.lease = deploy_id, claimed.fence, None
        with contextlib.suppress(LockHeld):  # someone else's live lease: this bot holds nothing
            bot.lease = self.run(
                self.ledger.acquire_lease(self.env, holder=bot.name, deploy_id=deploy_id, ttl=TTL)
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
            self.run(self.ledger.prove(bot.deploy_id, bot.fence, [bot.lease], ttl=TTL))
        except Fenced:
            return
        self.effects.append((name, bot.deploy_id, bot.fence.epoch, bot.lease.epoch))

    @precondition(lambda self: bool(self._holding()))
    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self._holding()))
        bot = self.bots[name]
        if bot.fence is None:
            return
        try:
            self.run(self.ledger.update_deploy(bot.deploy_id, fence=bot.fence, message=f"by {name}"))
        except Fenced:
            return
        self.accepted_writes.append((name, bot.deploy_id, bot.fence.epoch))

    @precondition(lambda self: bool(self._holding()))
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        """Renew the lease as the service's heartbeat does: a proof with no side effect after it."""
        name = data.draw(st.sampled_from(self._holding()))
        bot = self.bots[name]
        if bot.fence is not None and bot.lease is not None:
            with contextlib.suppress(Fenced):
                self.run(self.ledger.prove(bot.deploy_id, bot.fence, [bot.lease], ttl=TTL))

    @precondition(lambda self: hasattr(self, "deploy_ids"))
    @rule(seconds=st.sampled_from([10.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.now += timedelta(seconds=seconds)

    # ---- what must hold ----

    @invariant()
    def one_actor_per_fence(self) -> None:
        # The fencing token of a side effect is (deploy epoch, lease epoch): a restarted bot that renews its own
        # live lease keeps the lease epoch but claims the next deploy epoch, which fences out its old self.
        by_deploy_epoch: dict[tuple[str, int], set[str]] = {}
        by_lease_epoch: dict[int, set[str]] = {}
        for name, deploy_id, deploy_epoch, lease_epoch in self.effects:
            by_deploy_epoch.setdefault((deploy_id, deploy_epoch), set()).add(name)
            by_lease_epoch.setdefault(lease_epoch, set()).add(deploy_id)
        assert all(len(v) == 1 for v in by_deploy_epoch.values()), self.effects
        assert all(len(v) == 1 for v in by_lease_epoch.values()), self.effects  # one deploy per lease

    @invariant()
    def effects_never_go_back(self) -> None:
        # On the env, the lease epoch never goes back; within a deploy, neither does its epoch.
        lease_epochs = [le for *_, le in self.effects]
        assert lease_epochs == sorted(lease_epochs), self.effects
        for deploy_id in {d for _, d, _, _ in self.effects}:
            epochs = [e for _, d, e, _ in self.effects if d == deploy_id]
            assert epochs == sorted(epochs), self.effects

    @invariant()
    def no_stale_write(self) -> None:
        # A write is accepted only at the deploy's epoch of its time: per deploy, epochs of accepted writes
        # never go back and each epoch has one writer.
        writers: dict[tuple[str, int], set[str]] = {}
        for name, deploy_id, epoch in self.accepted_writes:
            writers.setdefault((deploy_id, epoch), set()).add(name)
        assert all(len(v) == 1 for v in writers.values()), self.accepted_writes
        for deploy_id in {d for _, d, _ in self.accepted_writes}:
            epochs = [e for _, d, e in self.accepted_writes if d == deploy_id]
            assert epochs == sorted(epochs), self.accepted_writes


TwoBots.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class TestTwoBotsNeverActAtOneEpoch(TwoBots.TestCase):  # type: ignore[misc,valid-type]
    @classmethod
    def tearDownClass(cls) -> None:
        Shared.close()
        super().tearDownClass()
