"""Slack for the authority and for processes other than the bot: group membership (shared by the Slack
front and the CLI) and a Web API client of the CLI's own."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot import mrkdwn

log = logging.getLogger(__name__)

SlackClient = AsyncWebClient  # for code outside the Slack edge that holds one (the CLI)


async def group_members(client: AsyncWebClient, group: str) -> frozenset[str]:
    """The user IDs in a group named by handle (`@name`) or ID (`S…`); empty when it does not exist."""
    group_id = await _group_id(client, group)
    if group_id is None:
        return frozenset()
    resp = await client.usergroups_users_list(usergroup=group_id)
    return frozenset(resp.get("users", []))


async def mention(client: AsyncWebClient, principal: str) -> str | None:
    """How to ping a principal of the environments file in a message: a user `<@U…>`, a group
    `<!subteam^S…>` (a handle is looked up); None for `*` (everyone: nobody to ping) or an unknown group."""
    if principal == "*":
        return None
    if principal[:1] in ("U", "W"):
        return mrkdwn.mention(principal)
    group_id = await _group_id(client, principal)
    return f"<!subteam^{group_id}>" if group_id else None


async def _group_id(client: AsyncWebClient, group: str) -> str | None:
    """A group's ID from its handle (`@name`) or as given (`S…`); None when no group has that handle."""
    if not group.startswith("@"):
        return group
    listing = await client.usergroups_list()
    groups: list[dict[str, Any]] = listing.get("usergroups", [])
    found = [str(g["id"]) for g in groups if g.get("handle") == group[1:]]
    if not found:
        log.warning("user group %s does not exist in this workspace", group)
        return None
    return found[0]


class SlackPeople:
    """`Name <email>` of workspace members from users.info (scope users:read.email), remembered per process:
    a person's name in a deploy commit does not need to be fresher than the process."""

    def __init__(self, client: AsyncWebClient) -> None:
        self._client = client
        self._known: dict[str, str | None] = {}

    async def identity(self, user: str) -> str | None:
        if user in self._known:
            return self._known[user]
        if user[:1] not in ("U", "W"):
            return None
        try:
            resp = await self._client.users_info(user=user)
        except SlackApiError as e:
            if e.response.get("error") != "user_not_found":
                raise
            found = None
        else:
            found = _signature(resp.get("user") or {})
        self._known[user] = found
        return found


def _signature(user: dict[str, Any]) -> str | None:
    profile = user.get("profile") or {}
    name = str(profile.get("real_name") or user.get("real_name") or user.get("name") or "")
    email = str(profile.get("email") or "")
    name = " ".join(name.replace("<", " ").replace(">", " ").split())
    if not name or not email or any(c in email for c in "<> \n"):
        return None
    return f"{name} <{email}>"


async def user_by_email(client: AsyncWebClient, email: str) -> str | None:
    """The Slack user ID with this e-mail address, or None when the workspace has nobody with it."""
    try:
        resp = await client.users_lookupByEmail(email=email)
    except SlackApiError as e:
        if e.response.get("error") == "users_not_found":
            return None
        raise
    user = resp.get("user") or {}
    return str(user["id"]) if user.get("id") else None


@contextlib.asynccontextmanager
async def connect(token: str, api_url: str) -> AsyncIterator[AsyncWebClient]:
    """A Web API client with its own HTTP session, for a process that is not the bot (the CLI)."""
    async with aiohttp.ClientSession() as session:
        yield AsyncWebClient(
            token=token,
            base_url=api_url,
            session=session,
            timeout=10,
            retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=3)],
        )
