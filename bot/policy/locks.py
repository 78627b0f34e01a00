"""The one lock rule, asked by preflight, the deploy service and the lease keeper alike.

An env's manual lock holds every run out, with one exception: the lock the bot itself sets after a
failed deploy (user `funnelcake-bot`) lets a rollback through, since rolling back is the way out of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from bot.ledger.models import ManualLock, who
from bot.models import BOT_USER, DeployKind


def passes(lock: ManualLock, kind: DeployKind) -> bool:
    """Whether a run of `kind` may go ahead in spite of `lock`."""
    return kind is DeployKind.ROLLBACK and lock.user == BOT_USER


def blocking(locks: Iterable[ManualLock], envs: Sequence[str], kind: DeployKind) -> list[ManualLock]:
    """The locks on `envs` that hold a run of `kind` out, in the order of `envs`."""
    by_env = {lock.env: lock for lock in locks}
    return [by_env[e] for e in envs if e in by_env and not passes(by_env[e], kind)]


def describe(lock: ManualLock) -> str:
    return f"{lock.env} is locked by {who(lock.user)} since {lock.since:%Y-%m-%d %H:%M} UTC: {lock.reason}"
