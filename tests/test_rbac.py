"""Who may do what: user IDs and groups from the environments file, group membership cached with a TTL."""

from __future__ import annotations

import asyncio

import pytest

from bot.policy.rbac import GroupCache, Policy
from bot.settings import DEFAULT_CONFIG_PATH, load_config

GROUPS = {"@funnelcake-approvers": {"U0BOB", "U0CAROL"}, "@funnelcake-deployers": {"U0ALICE", "U0BOB"}}


class Directory:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def members(self, group: str) -> frozenset[str]:
        self.calls.append(group)
        await asyncio.sleep(0.01)
        return frozenset(GROUPS.get(group, set()))


@pytest.fixture
def directory() -> Directory:
    return Directory()


async def test_roles_come_from_the_environments_file(directory: Directory) -> None:
    config = load_config(DEFAULT_CONFIG_PATH)
    policy = Policy(config, GroupCache(directory.members))
    prod, staging = config.env("production"), config.env("staging")
    assert (await policy.can_deploy(prod, "U0ALICE")).allowed
    refused = await policy.can_deploy(prod, "U0DAVE")
    assert not refused.allowed
    assert refused.reason == "you may not deploy to production: deployers are @funnelcake-deployers"
    assert (await policy.can_deploy(staging, "U0DAVE")).allowed  # staging: anyone
    assert (await policy.can_approve(prod, "U0CAROL")).allowed
    assert not (await policy.can_approve(prod, "U0ALICE")).allowed
    assert not (await policy.can_admin(staging, "U0ALICE")).allowed
    assert (await policy.can_admin(staging, "U0BOB")).allowed


async def test_group_lookups_are_shared_and_cached_until_the_ttl(directory: Directory) -> None:
    cache = GroupCache(directory.members, ttl=0.2)
    results = await asyncio.gather(*(cache.members("@funnelcake-approvers") for _ in range(10)))
    assert all(r == frozenset({"U0BOB", "U0CAROL"}) for r in results)
    assert directory.calls == ["@funnelcake-approvers"]  # ten concurrent checks, one Slack call
    await cache.members("@funnelcake-approvers")
    assert len(directory.calls) == 1
    await asyncio.sleep(0.25)
    await cache.members("@funnelcake-approvers")
    assert len(directory.calls) == 2  # membership changes in Slack are seen after the TTL
