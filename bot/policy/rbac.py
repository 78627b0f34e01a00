"""Who may do what, from the environments file: deployers, approvers and admins, by Slack user or user group."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bot.settings import Environment, FunnelcakeConfig

# Resolves a group (an "@handle" or an "S…" ID) to its members' user IDs.
GroupMembers = Callable[[str], Awaitable[frozenset[str]]]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""


class GroupCache:
    """Caches group membership for `ttl` seconds; concurrent lookups of one group share one request."""

    def __init__(self, fetch: GroupMembers, *, ttl: float = 300.0) -> None:
        self._fetch = fetch
        self.ttl = ttl
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def members(self, group: str) -> frozenset[str]:
        hit = self._cache.get(group)
        if hit is not None and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        async with self._locks.setdefault(group, asyncio.Lock()):
            hit = self._cache.get(group)
            if hit is not None and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
            members = await self._fetch(group)
            self._cache[group] = (time.monotonic(), members)
            return members


class Policy:
    def __init__(self, config: FunnelcakeConfig, groups: GroupCache) -> None:
        self.config = config
        self.groups = groups

    async def _member(self, user: str, principals: Sequence[str]) -> bool:
        for p in principals:
            if p in ("*", user):
                return True
            if (p.startswith("@") or p.startswith("S")) and user in await self.groups.members(p):
                return True
        return False

    @staticmethod
    def _names(principals: Sequence[str]) -> str:
        return ", ".join(p if p.startswith("@") or p == "*" else f"<@{p}>" for p in principals) or "nobody"

    async def can_deploy(self, env: Environment, user: str) -> Decision:
        if await self._member(user, env.deployers):
            return Decision(True)
        return Decision(
            False, f"you may not deploy to {env.name}: deployers are {self._names(env.deployers)}"
        )

    async def can_approve(self, env: Environment, user: str) -> Decision:
        if await self._member(user, env.approvers):
            return Decision(True)
        return Decision(
            False, f"you may not approve {env.name} deploys: approvers are {self._names(env.approvers)}"
        )

    async def can_admin(self, env: Environment, user: str) -> Decision:
        """Force a migration version or lift someone else's lock: admins, or approvers when none are set."""
        admins = env.admins or env.approvers
        if await self._member(user, admins):
            return Decision(True)
        return Decision(False, f"only {self._names(admins)} may do this in {env.name}")
