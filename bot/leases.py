"""One deploy's hold on its envs: acquire the leases in order, heart-beat, fence every side effect, release.

A lease can lapse while its holder still runs (a paused process, a ledger it cannot reach), so holding one
is not enough to act: before each world-changing action the run proves, in one ledger transaction, that it
still owns the deploy at its epoch and holds every lease at the env's epoch, unexpired. A successor's
take-over moves both epochs on, so a stale bot's proof and every write it attempts fail (`Fenced`).

The keeper also watches the deploy's row about once a second: a cancel request made through any replica,
or an owner change, reaches the bot that runs the deploy within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from bot.errors import TransientError
from bot.ledger import Fence, Fenced, Lease, Ledger, LockHeld, ManualLock

log = logging.getLogger(__name__)

# How often the keeper looks at the deploy's row for a cancel request (a cheap read; a click on either
# replica must reach the owning bot within about two seconds).
WATCH_EVERY = 1.0


@dataclass(frozen=True)
class LeaseLost:
    """Why a run must stop: it can no longer prove it owns its deploy."""

    why: str


class LeaseKeeper:
    """Holds one deploy's leases for one bot at one epoch; see the module docstring."""

    def __init__(
        self,
        ledger: Ledger,
        deploy_id: str,
        fence: Fence,
        *,
        ttl: float,
        heartbeat_every: float,
        on_lost: Callable[[LeaseLost], None],
        on_cancel: Callable[[str], None],
        watch_every: float = WATCH_EVERY,
    ) -> None:
        self.ledger = ledger
        self.deploy_id = deploy_id
        self.fence = fence
        self.ttl = ttl
        self.heartbeat_every = heartbeat_every
        self.watch_every = min(watch_every, heartbeat_every)
        # A proof must leave this much of the lease to spare: time for the action to start before any
        # successor may take over.
        self.margin = min(ttl / 5, 5.0)
        self.on_lost = on_lost
        self.on_cancel = on_cancel
        self.leases: list[Lease] = []
        self.lost: LeaseLost | None = None
        self._valid_until = 0.0  # monotonic: when the last renewal we saw succeed runs out
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None

    # ---- acquire / release -------------------------------------------------------------------

    async def acquire(self, envs: Sequence[str], *, passes: Callable[[ManualLock], bool]) -> None:
        """Take every env in a fixed order (two multi-env deploys never deadlock); all or nothing.

        `passes` is the lock rule: whether a manual lock lets this deploy through."""
        try:
            for env in sorted(envs):
                lock = await self._lock_on(env, passes)
                started = time.monotonic()
                lease = await self.ledger.acquire_lease(
                    env,
                    holder=self.fence.owner,
                    deploy_id=self.deploy_id,
                    ttl=self.ttl,
                    ignore_lock_by=lock.user if lock is not None else None,
                )
                self._valid_until = (
                    started + self.ttl if not self.leases else min(self._valid_until, started + self.ttl)
                )
                self.leases.append(lease)
        except BaseException:
            await self.release()
            raise
        self._task = asyncio.create_task(self._keep(), name=f"lease-keeper-{self.deploy_id}")
        self._task.add_done_callback(self._keeper_done)

    async def _lock_on(self, env: str, passes: Callable[[ManualLock], bool]) -> ManualLock | None:
        """The env's manual lock if the rule lets this deploy through it; LockHeld if it does not."""
        lock = next((lk for lk in await self.ledger.locks() if lk.env == env), None)
        if lock is not None and not passes(lock):
            raise LockHeld.for_lock(lock, datetime.now(UTC))
        return lock

    async def release(self) -> None:
        """Stop heart-beating and free the envs (only at our epoch: a successor's lease is left alone)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        leases, self.leases = self.leases, []
        for lease in leases:
            try:
                async with asyncio.timeout(10):
                    await self.ledger.release_lease(lease.env, self.fence.owner, epoch=lease.epoch)
            except (TransientError, TimeoutError):
                # It lapses by itself within the TTL; a successor may take it then.
                log.warning(
                    "could not release the lease on %s for %s; it lapses by itself", lease.env, self.deploy_id
                )

    # ---- the fence ---------------------------------------------------------------------------

    async def prove(self, action: str) -> None:
        """Before `action` changes the world: prove the deploy and every lease are still ours, or raise Fenced.

        Transient ledger errors are retried while the lease would still be valid with the margin to spare."""
        if self.lost is not None:
            raise Fenced(self.deploy_id, self.lost.why)
        while True:
            budget = self._valid_until - self.margin - time.monotonic()
            if budget <= 0:
                break
            started = time.monotonic()
            try:
                async with asyncio.timeout(budget):
                    await self.ledger.prove(self.deploy_id, self.fence, self.leases, ttl=self.ttl)
            except Fenced as e:
                self._lose(LeaseLost(e.why))
                raise
            except (TransientError, TimeoutError):
                await asyncio.sleep(min(0.5, max(budget, 0.01)))
                continue
            self._valid_until = started + self.ttl
            return
        lost = LeaseLost(f"it could not reach the ledger to prove its lease before {action}")
        self._lose(lost)
        raise Fenced(self.deploy_id, lost.why)

    # ---- heartbeat and watch -----------------------------------------------------------------

    async def _keep(self) -> None:
        next_beat = time.monotonic() + self.heartbeat_every
        while True:
            await asyncio.sleep(self.watch_every)
            due = time.monotonic() >= next_beat or self._failing_since is not None
            if due and await self._beat():
                next_beat = time.monotonic() + self.heartbeat_every
            if self.lost is not None:
                return
            await self._watch()

    async def _beat(self) -> bool:
        """Renew every lease; transient failures are retried on the next tick until the lease would lapse."""
        started = time.monotonic()
        budget = self._valid_until - self.margin - started
        try:
            # A budget already spent times out at once: the lease cannot be proven in time.
            async with asyncio.timeout(max(budget, 0)):
                await self.ledger.prove(self.deploy_id, self.fence, self.leases, ttl=self.ttl)
        except Fenced as e:
            self._lose(LeaseLost(e.why))
            return False
        except (TransientError, TimeoutError) as e:
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = started
                log.warning(
                    "ledger unreachable while renewing the leases of %s (%s); retrying while they hold",
                    self.deploy_id,
                    getattr(e, "message", "timed out"),
                )
            if self._valid_until - self.margin <= now:
                self._lose(
                    LeaseLost(
                        f"it could not reach the ledger for {now - self._failing_since:.0f} s "
                        f"and its lease ran out"
                    )
                )
            return False
        if self._failing_since is not None:
            log.info(
                "ledger reachable again; leases of %s renewed after %.1f s",
                self.deploy_id,
                started - self._failing_since,
            )
            self._failing_since = None
        self._valid_until = started + self.ttl
        return True

    async def _watch(self) -> None:
        try:
            async with asyncio.timeout(max(self.watch_every, 0.5)):
                control = await self.ledger.control(self.deploy_id)
        except (TransientError, TimeoutError):
            return  # the heartbeat reports the outage
        if (control.owner, control.epoch) != (self.fence.owner, self.fence.epoch):
            self._lose(LeaseLost(f"{control.owner or 'nobody'} owns it now (epoch {control.epoch})"))
        elif control.cancel_requested_by is not None:
            self.on_cancel(control.cancel_requested_by)

    def _lose(self, lost: LeaseLost) -> None:
        if self.lost is not None:
            return
        self.lost = lost
        log.error("lost deploy %s: %s; stopping before the next side effect", self.deploy_id, lost.why)
        self.on_lost(lost)

    def _keeper_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A keeper that crashed can no longer vouch for the lease: the run must stop.
            log.error("lease keeper of %s failed", self.deploy_id, exc_info=exc)
            self._lose(LeaseLost(f"its lease keeper failed ({type(exc).__name__})"))
