"""One authority for every entry point: who may do what, for Slack commands, buttons and the CLI alike.

Roles come from the environments file: deployers, approvers and admins per env, by Slack user or user
group. `Authority.decide(action, principal, envs)` is the only place a rule lives; the README's
authorization matrix is this module written out as a table (and tests/test_authz_matrix.py checks both).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from bot.ledger.models import who
from bot.mrkdwn import mention
from bot.settings import Environment, FunnelcakeConfig

# Resolves a group (an "@handle" or an "S…" ID) to its members' user IDs.
GroupMembers = Callable[[str], Awaitable[frozenset[str]]]


class Action(StrEnum):
    STATUS = "status"
    HISTORY = "history"
    PLAN = "plan"
    DEPLOY = "deploy"
    MIGRATE = "migrate"
    FORCE = "force"
    APPROVE = "approve"
    DENY = "deny"
    CANCEL = "cancel"
    ROLLBACK = "rollback"
    LOCK = "lock"
    UNLOCK = "unlock"
    CATCHUP = "catchup"
    REBUILD = "rebuild"

    @property
    def read_only(self) -> bool:
        return self in READ_ONLY


READ_ONLY = frozenset({Action.STATUS, Action.HISTORY, Action.PLAN})
# Actions that change an env and need a deployer of every env they touch.
DEPLOYER_ACTIONS = frozenset(
    {Action.DEPLOY, Action.MIGRATE, Action.ROLLBACK, Action.LOCK, Action.CATCHUP, Action.REBUILD}
)


@dataclass(frozen=True)
class Principal:
    """Who is asking. `user` is the Slack user the rules apply to; None for a CLI user no operator maps."""

    user: str | None
    source: Literal["slack", "cli"] = "slack"
    os_user: str | None = None
    host: str | None = None

    @property
    def origin(self) -> str:
        """Where the request came from, for the audit trail next to the principal."""
        if self.source == "cli":
            return f"cli:{self.os_user or '?'}@{self.host or '?'}"
        return "slack"

    @property
    def name(self) -> str:
        return self.user or f"{self.os_user or '?'}@{self.host or '?'}"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


ALLOWED = Verdict(True)


class GroupCache:
    """Caches group membership for `ttl` seconds; concurrent lookups of one group share one request.

    `fresh=True` asks Slack now (an approval must not rest on a membership removed minutes ago)."""

    def __init__(self, fetch: GroupMembers, *, ttl: float = 300.0) -> None:
        self._fetch = fetch
        self.ttl = ttl
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def members(self, group: str, *, fresh: bool = False) -> frozenset[str]:
        asked = time.monotonic()
        hit = self._cache.get(group)
        if hit is not None and (hit[0] >= asked if fresh else asked - hit[0] < self.ttl):
            return hit[1]
        async with self._locks.setdefault(group, asyncio.Lock()):
            hit = self._cache.get(group)
            # A lookup that started after this request was made is fresh enough for it.
            if hit is not None and (hit[0] >= asked if fresh else time.monotonic() - hit[0] < self.ttl):
                return hit[1]
            started = time.monotonic()
            members = await self._fetch(group)
            self._cache[group] = (started, members)
            return members


class Authority:
    def __init__(self, config: FunnelcakeConfig, groups: GroupCache) -> None:
        self.config = config
        self.groups = groups

    async def decide(
        self,
        action: Action,
        principal: Principal,
        envs: Sequence[str],
        *,
        requester: str | None = None,
        lock_holder: str | None = None,
    ) -> Verdict:
        """May `principal` do `action` in `envs`? `requester` is the deploy's (approve, deny, cancel);
        `lock_holder` the user holding the env's lock (unlock)."""
        unknown = [e for e in envs if e not in self.config.env_names]
        if unknown:
            return Verdict(
                False,
                f"there is no environment {unknown[0]!r} (expected {', '.join(self.config.env_names)})",
            )
        if action.read_only:
            return ALLOWED
        user = principal.user
        if user is None:
            return Verdict(
                False,
                f"the OS user {principal.os_user or '?'} is not mapped to a Slack user, so only status, "
                "history and plan work: add it to `operators` in the environments file",
            )
        targets = [self.config.env(e) for e in envs]
        if action in DEPLOYER_ACTIONS:
            return await self._deployer(targets, user)
        if action is Action.FORCE:
            return await self._admin(targets, user)
        if action is Action.UNLOCK:
            if lock_holder is None or lock_holder == user:
                return await self._deployer(targets, user)
            return await self._admin(targets, user, what=f"lift a lock held by {who(lock_holder)}")
        if action is Action.APPROVE:
            approver = await self._approver(targets, user)
            if approver.allowed and user == requester:
                return Verdict(False, "you cannot approve your own deploy: another approver must")
            return approver
        if action is Action.DENY:
            if user == requester:
                return ALLOWED  # the requester withdraws the request
            return await self._approver(targets, user)
        if action is Action.CANCEL:
            if user == requester:
                return ALLOWED
            deployer = await self._deployer(targets, user)
            if deployer.allowed or any([(await self._admin([e], user)).allowed for e in targets]):
                return ALLOWED
            return Verdict(
                False,
                f"only its requester {who(requester or '?')}, the deployers of "
                f"{', '.join(envs)} or an admin may cancel it ({deployer.reason})",
            )
        raise AssertionError(f"no rule for {action}")  # pragma: no cover - every Action has a branch

    def approval_envs(self, envs: Sequence[str]) -> list[Environment]:
        return [self.config.env(e) for e in envs if self.config.env(e).approval_required]

    async def approves(self, env: Environment, user: str) -> bool:
        """Is `user` an approver of `env` right now (asked fresh of Slack, not from the cache)?"""
        return await self._member(user, env.approvers, fresh=True)

    # ---- the building blocks ------------------------------------------------------------------------

    async def _member(self, user: str, principals: Sequence[str], *, fresh: bool = False) -> bool:
        for p in principals:
            if p in ("*", user):
                return True
            if (p.startswith("@") or p.startswith("S")) and user in await self.groups.members(p, fresh=fresh):
                return True
        return False

    async def _deployer(self, envs: Sequence[Environment], user: str) -> Verdict:
        for env in envs:
            if not await self._member(user, env.deployers):
                return Verdict(
                    False, f"you may not deploy to {env.name}: deployers are {_names(env.deployers)}"
                )
        return ALLOWED

    async def _admin(self, envs: Sequence[Environment], user: str, *, what: str = "do this") -> Verdict:
        """Admins, or approvers when none are set, of every env."""
        for env in envs:
            admins = env.admins or env.approvers
            if not await self._member(user, admins):
                return Verdict(False, f"only {_names(admins)} may {what} in {env.name}")
        return ALLOWED

    async def _approver(self, envs: Sequence[Environment], user: str) -> Verdict:
        """Approving a multi-env request: one approver per env that needs approval; envs that need none do
        not block it. The user must approve at least one of them."""
        needing = [e for e in envs if e.approval_required]
        if not needing:
            return Verdict(False, f"{', '.join(e.name for e in envs)} needs no approval")
        for env in needing:
            if await self.approves(env, user):
                return ALLOWED
        env = needing[0]
        return Verdict(
            False, f"you may not approve {env.name} deploys: approvers are {_names(env.approvers)}"
        )


def _names(principals: Sequence[str]) -> str:
    return ", ".join(mention(p) for p in principals) or "nobody"


__all__ = ["ALLOWED", "Action", "Authority", "GroupCache", "Principal", "Verdict"]
