"""Who may do what: user IDs and groups from the environments file, group membership cached with a TTL\n(and asked fresh for an approval)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.policy.authz import Action, Authority, GroupCache, Principal
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
    authority = Authority(config, GroupCache(directory.members))

    async def decide(action: Action, user: str, envs: list[str], **kw: str) -> tuple[bool, str]:
        d = await authority.decide(action, Principal(user), envs, **kw)
        return d.allowed, d.reason

    assert (await decide(Action.DEPLOY, "U0ALICE", ["production"]))[0]
    assert await decide(Action.DEPLOY, "U0DAVE", ["production"]) == (
        False,
        "you may not deploy to production: deployers are @funnelcake-deployers",
    )
    assert (await decide(Action.DEPLOY, "U0DAVE", ["staging"]))[0]  # staging: anyone
    assert (await decide(Action.APPROVE, "U0CAROL", ["production"], requester="U0ALICE"))[0]
    assert not (await decide(Action.APPROVE, "U0ALICE", ["production"], requester="U0BOB"))[0]
    assert not (await decide(Action.FORCE, "U0ALICE", ["staging"]))[0]
    assert (await decide(Action.FORCE, "U0BOB", ["staging"]))[0]


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
    await cache.members("@funnelcake-approvers", fresh=True)
    assert len(directory.calls) == 3  # an approval asks Slack now, whatever the cache holds


async def test_a_refusal_mentions_the_users_it_names_and_shows_groups_as_written(
    directory: Directory, tmp_path: Path
) -> None:
    text = DEFAULT_CONFIG_PATH.read_text().replace(
        'deployers: ["@funnelcake-deployers"]', 'deployers: ["U0ERIN", "@funnelcake-deployers", "S0OPS"]', 1
    )
    path = tmp_path / "funnelcake.yaml"
    path.write_text(text)
    authority = Authority(load_config(path), GroupCache(directory.members))

    refused = await authority.decide(Action.DEPLOY, Principal("U0DAVE"), ["production"])

    # in Slack `<@U0ERIN>` is her name; a handle or a group ID is not a user mention
    assert (
        refused.reason
        == "you may not deploy to production: deployers are <@U0ERIN>, @funnelcake-deployers, S0OPS"
    )
