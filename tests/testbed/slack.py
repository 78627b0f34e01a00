"""A local Slack for the test bed: Web API, response_url endpoints, Socket Mode and signed-request builders.

`FakeSlack` is an aiohttp server on 127.0.0.1 that speaks the parts of Slack the bot uses, with the
limits Slack enforces (per-channel posting rate, Block Kit sizes, message length), so the bot is
tested against the contract rather than against its own call sites. It runs outside pytest too
(`async with FakeSlack() as slack: ...`); the `slack` fixture wraps it for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp import WSMsgType, web
from slack_sdk.errors import SlackObjectFormationError
from slack_sdk.models.blocks import Block as SdkBlock

BOT_TOKEN = "xoxb-0000000001-0000000002-testbedbottoken"
APP_TOKEN = "xapp-1-A0FUNNEL-0000000003-testbedapptoken"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"  # Slack's documented example shape, not a real secret
VERIFICATION_TOKEN = "testbedverificationtoken"
TEAM_ID = "T0FUNNEL"
TEAM_DOMAIN = "funnelcake-test"
APP_ID = "A0FUNNEL"
BOT_USER_ID = "U0BOT"
BOT_ID = "B0BOT"
BOT_NAME = "funnelcake"
DEFAULT_CHANNEL = "C0DEPLOYS"
DEFAULT_CHANNEL_NAME = "deploys"

# Slack's published limits (https://docs.slack.dev/reference/block-kit/blocks).
MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3000
MAX_SECTION_FIELDS = 10
MAX_FIELD_TEXT = 2000
MAX_HEADER_TEXT = 150
MAX_BUTTON_TEXT = 75
MAX_BUTTON_VALUE = 2000
MAX_ACTION_ID = 255
MAX_ACTIONS_ELEMENTS = 25
MAX_CONTEXT_ELEMENTS = 10
MAX_MESSAGE_TEXT = 40_000
# A response_url accepts up to five posts within 30 minutes.
MAX_RESPONSE_URL_USES = 5
ACK_DEADLINE = 3.0


@dataclass(frozen=True)
class SlackUser:
    id: str
    name: str
    real_name: str
    is_bot: bool = False
    deleted: bool = False

    @property
    def email(self) -> str:
        return f"{self.name}@funnelcake.test"


@dataclass(frozen=True)
class UserGroup:
    id: str
    handle: str
    name: str
    users: tuple[str, ...]


DEFAULT_USERS: tuple[SlackUser, ...] = (
    SlackUser("U0ALICE", "alice", "Alice Archer"),
    SlackUser("U0BOB", "bob", "Bob Baker"),
    SlackUser("U0CAROL", "carol", "Carol Chen"),
    SlackUser("U0DAVE", "dave", "Dave Diaz"),
    SlackUser("U0EVE", "eve", "Eve Evans"),
    SlackUser(BOT_USER_ID, BOT_NAME, "funnelcake deploy bot", is_bot=True),
)
DEFAULT_USERGROUPS: tuple[UserGroup, ...] = (
    UserGroup("S0DEPLOYERS", "funnelcake-deployers", "funnelcake deployers", ("U0ALICE", "U0BOB", "U0CAROL")),
    UserGroup("S0APPROVERS", "funnelcake-approvers", "funnelcake approvers", ("U0BOB", "U0CAROL")),
)


@dataclass
class SlackCall:
    """One Web API call as the server saw it, with the reply it gave."""

    method: str
    params: dict[str, Any]
    token: str | None
    at: float
    status: int = 200
    response: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.response.get("ok"))

    @property
    def error(self) -> str | None:
        err = self.response.get("error")
        return str(err) if err is not None else None


@dataclass
class ResponseUrlPost:
    """One POST to a minted response_url."""

    url_id: str
    body: dict[str, Any]
    at: float
    status: int
    error: str | None = None


@dataclass
class Message:
    """A message as a person in the channel would see it (after any chat.update)."""

    ts: str
    channel: str
    user: str
    text: str
    blocks: list[dict[str, Any]] | None = None
    thread_ts: str | None = None
    edited: bool = False
    deleted: bool = False
    ephemeral_to: str | None = None
    broadcast: bool = False  # a thread reply also sent to the channel (`reply_broadcast`)
    replies: list[Message] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.thread_ts is not None and self.thread_ts != self.ts

    @property
    def shown(self) -> str:
        """What a reader sees: the blocks' text when there are blocks (Slack shows `text` only as the
        notification fallback then), else `text`."""
        if not self.blocks:
            return self.text
        parts: list[str] = []
        for block in self.blocks:
            if isinstance(block.get("text"), dict):
                parts.append(_text_of(block["text"]))
            for el in block.get("elements") or block.get("fields") or []:
                if isinstance(el, dict) and el.get("type") in ("mrkdwn", "plain_text"):
                    parts.append(_text_of(el))
        return "\n".join(parts)

    def buttons(self) -> list[dict[str, Any]]:
        """Every button in the message's blocks, in display order, with its block_id added."""
        out: list[dict[str, Any]] = []
        for block in self.blocks or []:
            elements: list[Any] = []
            if block.get("type") == "actions":
                elements = list(block.get("elements") or [])
            elif block.get("type") == "section" and isinstance(block.get("accessory"), dict):
                elements = [block["accessory"]]
            for el in elements:
                if isinstance(el, dict) and el.get("type") == "button":
                    out.append({**el, "block_id": block.get("block_id", "")})
        return out


@dataclass
class _ResponseUrl:
    channel: str
    user_id: str
    message_ts: str | None
    uses: int = 0


@dataclass
class _Bucket:
    tokens: float
    updated: float


class SlackApiFailure(Exception):
    """A Web API refusal: becomes {"ok": false, "error": ...} with its HTTP status."""

    def __init__(self, error: str, *, status: int = 200, **extra: Any) -> None:
        super().__init__(error)
        self.error = error
        self.status = status
        self.extra = extra


# ---------------------------------------------------------------------------------------------
# Signed requests, as Slack sends them to an HTTP-mode app


def sign(secret: str, body: bytes, ts: int) -> str:
    """Slack's request signature: v0=HMAC-SHA256(secret, "v0:{ts}:{body}")."""
    base = b"v0:" + str(ts).encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


def signed_headers(
    body: bytes,
    signing_secret: str,
    *,
    content_type: str = "application/x-www-form-urlencoded",
    timestamp: int | None = None,
    age: float = 0,
    forge: bool = False,
) -> dict[str, str]:
    """Headers Slack adds; `age` back-dates the timestamp, `forge` signs with a wrong secret."""
    ts = int(timestamp if timestamp is not None else time.time() - age)
    secret = signing_secret + "-forged" if forge else signing_secret
    return {
        "Content-Type": content_type,
        "X-Slack-Request-Timestamp": str(ts),
        "X-Slack-Signature": sign(secret, body, ts),
    }


def _trigger_id() -> str:
    return f"{secrets.randbelow(10**13)}.{secrets.randbelow(10**13)}.{secrets.token_hex(16)}"


def slash_command_payload(
    *,
    text: str = "",
    command: str = "/funnelcake",
    user_id: str = "U0ALICE",
    user_name: str = "alice",
    channel_id: str = DEFAULT_CHANNEL,
    channel_name: str = DEFAULT_CHANNEL_NAME,
    response_url: str = "https://hooks.slack.com/commands/T0FUNNEL/1/unused",
    team_id: str = TEAM_ID,
    team_domain: str = TEAM_DOMAIN,
    api_app_id: str = APP_ID,
    token: str = VERIFICATION_TOKEN,
    trigger_id: str | None = None,
) -> dict[str, str]:
    """The fields of a slash command, in the order Slack sends them."""
    return {
        "token": token,
        "team_id": team_id,
        "team_domain": team_domain,
        "channel_id": channel_id,
        "channel_name": channel_name,
        "user_id": user_id,
        "user_name": user_name,
        "command": command,
        "text": text,
        "api_app_id": api_app_id,
        "is_enterprise_install": "false",
        "response_url": response_url,
        "trigger_id": trigger_id or _trigger_id(),
    }


def block_actions_payload(
    *,
    action_id: str,
    value: str = "",
    block_id: str = "",
    label: str = "",
    message: Mapping[str, Any] | None = None,
    user_id: str = "U0ALICE",
    user_name: str = "alice",
    channel_id: str = DEFAULT_CHANNEL,
    channel_name: str = DEFAULT_CHANNEL_NAME,
    response_url: str = "https://hooks.slack.com/actions/T0FUNNEL/1/unused",
    team_id: str = TEAM_ID,
    team_domain: str = TEAM_DOMAIN,
    api_app_id: str = APP_ID,
    token: str = VERIFICATION_TOKEN,
) -> dict[str, Any]:
    """A block_actions payload for one button click on a message."""
    msg = dict(message or {"type": "message", "ts": f"{time.time():.6f}", "text": ""})
    msg.setdefault("type", "message")
    msg.setdefault("user", BOT_USER_ID)
    msg.setdefault("bot_id", BOT_ID)
    msg_ts = str(msg.get("ts", ""))
    return {
        "type": "block_actions",
        "user": {"id": user_id, "username": user_name, "name": user_name, "team_id": team_id},
        "api_app_id": api_app_id,
        "token": token,
        "container": {
            "type": "message",
            "message_ts": msg_ts,
            "channel_id": channel_id,
            "is_ephemeral": False,
            **({"thread_ts": msg["thread_ts"]} if msg.get("thread_ts") else {}),
        },
        "trigger_id": _trigger_id(),
        "team": {"id": team_id, "domain": team_domain},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel_id, "name": channel_name},
        "message": msg,
        "state": {"values": {}},
        "response_url": response_url,
        "actions": [
            {
                "action_id": action_id,
                "block_id": block_id,
                "text": {"type": "plain_text", "text": label or action_id, "emoji": True},
                "value": value,
                "type": "button",
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }


def slash_command(
    *,
    signing_secret: str = SIGNING_SECRET,
    timestamp: int | None = None,
    age: float = 0,
    forge: bool = False,
    **fields: Any,
) -> tuple[bytes, dict[str, str]]:
    """A signed, form-encoded slash command request (body, headers); fields as slash_command_payload."""
    body = urlencode(slash_command_payload(**fields)).encode()
    return body, signed_headers(body, signing_secret, timestamp=timestamp, age=age, forge=forge)


def block_actions(
    *,
    signing_secret: str = SIGNING_SECRET,
    timestamp: int | None = None,
    age: float = 0,
    forge: bool = False,
    **fields: Any,
) -> tuple[bytes, dict[str, str]]:
    """A signed `payload=<json>` interactivity request (body, headers); fields as block_actions_payload."""
    payload = block_actions_payload(**fields)
    body = urlencode({"payload": json.dumps(payload, separators=(",", ":"))}).encode()
    return body, signed_headers(body, signing_secret, timestamp=timestamp, age=age, forge=forge)


# ---------------------------------------------------------------------------------------------
# Block Kit validation: the subset of Slack's schema whose limits the bot can run into


def _text_of(obj: Any) -> str:
    if isinstance(obj, dict):
        t = obj.get("text")
        return t if isinstance(t, str) else ""
    return ""


def validate_blocks(blocks: Any) -> list[str]:
    """Problems Slack would report for these blocks, worded like its `errors` list; empty when valid."""
    if not isinstance(blocks, list):
        return ["must be an array [json-pointer:/blocks]"]
    problems: list[str] = []
    if len(blocks) > MAX_BLOCKS:
        problems.append(f"no more than {MAX_BLOCKS} items allowed [json-pointer:/blocks]")
    block_ids: set[str] = set()
    action_ids: set[str] = set()

    def check_button(el: dict[str, Any], ptr: str) -> None:
        if len(_text_of(el.get("text"))) > MAX_BUTTON_TEXT:
            problems.append(
                f"must be less than {MAX_BUTTON_TEXT + 1} characters [json-pointer:{ptr}/text/text]"
            )
        value = el.get("value")
        if isinstance(value, str) and len(value) > MAX_BUTTON_VALUE:
            problems.append(f"must be less than {MAX_BUTTON_VALUE + 1} characters [json-pointer:{ptr}/value]")
        confirm = el.get("confirm")
        if confirm is not None:  # Slack's confirmation dialog object and its limits
            for key, limit, kinds in (
                ("title", 100, ("plain_text",)),
                ("text", 300, ("plain_text", "mrkdwn")),
                ("confirm", 30, ("plain_text",)),
                ("deny", 30, ("plain_text",)),
            ):
                obj = confirm.get(key) if isinstance(confirm, dict) else None
                if not isinstance(obj, dict) or obj.get("type") not in kinds:
                    problems.append(f"missing required field: {key} [json-pointer:{ptr}/confirm/{key}]")
                elif len(_text_of(obj)) > limit:
                    problems.append(
                        f"must be less than {limit + 1} characters [json-pointer:{ptr}/confirm/{key}/text]"
                    )
        aid = el.get("action_id")
        if isinstance(aid, str):
            if len(aid) > MAX_ACTION_ID:
                problems.append(
                    f"must be less than {MAX_ACTION_ID + 1} characters [json-pointer:{ptr}/action_id]"
                )
            if aid in action_ids:
                problems.append(f"action_id already exists [json-pointer:{ptr}/action_id]")
            action_ids.add(aid)

    for i, block in enumerate(blocks):
        ptr = f"/blocks/{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            problems.append(f"missing required field: type [json-pointer:{ptr}]")
            continue
        bid = block.get("block_id")
        if isinstance(bid, str):
            if bid in block_ids:
                problems.append(f"block_id already exists [json-pointer:{ptr}/block_id]")
            block_ids.add(bid)
        kind = block["type"]
        if kind == "section":
            text = block.get("text")
            fields_ = block.get("fields")
            if text is None and not fields_:
                problems.append(f"must provide text or fields [json-pointer:{ptr}]")
            if len(_text_of(text)) > MAX_SECTION_TEXT:
                problems.append(
                    f"must be less than {MAX_SECTION_TEXT + 1} characters [json-pointer:{ptr}/text/text]"
                )
            if isinstance(fields_, list):
                if len(fields_) > MAX_SECTION_FIELDS:
                    problems.append(
                        f"no more than {MAX_SECTION_FIELDS} items allowed [json-pointer:{ptr}/fields]"
                    )
                for j, f in enumerate(fields_):
                    if len(_text_of(f)) > MAX_FIELD_TEXT:
                        problems.append(
                            f"must be less than {MAX_FIELD_TEXT + 1} characters [json-pointer:{ptr}/fields/{j}/text]"
                        )
            acc = block.get("accessory")
            if isinstance(acc, dict) and acc.get("type") == "button":
                check_button(acc, f"{ptr}/accessory")
        elif kind == "header":
            if len(_text_of(block.get("text"))) > MAX_HEADER_TEXT:
                problems.append(
                    f"must be less than {MAX_HEADER_TEXT + 1} characters [json-pointer:{ptr}/text/text]"
                )
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not elements:
                problems.append(f"must provide elements [json-pointer:{ptr}/elements]")
                continue
            if len(elements) > MAX_ACTIONS_ELEMENTS:
                problems.append(
                    f"no more than {MAX_ACTIONS_ELEMENTS} items allowed [json-pointer:{ptr}/elements]"
                )
            for j, el in enumerate(elements):
                if isinstance(el, dict) and el.get("type") == "button":
                    check_button(el, f"{ptr}/elements/{j}")
        elif kind == "context":
            elements = block.get("elements")
            if isinstance(elements, list) and len(elements) > MAX_CONTEXT_ELEMENTS:
                problems.append(
                    f"no more than {MAX_CONTEXT_ELEMENTS} items allowed [json-pointer:{ptr}/elements]"
                )
    # The SDK's own Block Kit models judge too: what slack_sdk.models refuses, Slack refuses.
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            continue
        parsed = SdkBlock.parse(block)
        if parsed is None or type(parsed) is SdkBlock:
            problems.append(f"unknown block type {block.get('type')!r} [json-pointer:/blocks/{i}]")
            continue
        try:
            parsed.to_dict()  # validates the block and, recursively, every element and text object in it
        except SlackObjectFormationError as e:
            problems.append(f"{e} [json-pointer:/blocks/{i}]")
    return problems


# ---------------------------------------------------------------------------------------------
# Rendering: what a person would read in the channel


_MENTION = re.compile(r"<([@#!])([^>|]+)(?:\|([^>]*))?>|<([^>|]+)\|([^>]*)>|<([^>]+)>")


class FakeSlack:
    """A local Slack workspace: Web API at `.api_url`, response_url endpoints and Socket Mode."""

    def __init__(
        self,
        *,
        bot_token: str = BOT_TOKEN,
        app_token: str = APP_TOKEN,
        signing_secret: str = SIGNING_SECRET,
        users: Iterable[SlackUser] = DEFAULT_USERS,
        usergroups: Iterable[UserGroup] = DEFAULT_USERGROUPS,
        post_interval: float | None = 1.0,
        post_burst: int = 3,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """`post_interval` is the seconds per chat.postMessage a channel earns back (None: no limit);
        `post_burst` is how many a channel may send at once before Slack answers 429."""
        self.bot_token = bot_token
        self.app_token = app_token
        self.signing_secret = signing_secret
        self.users: dict[str, SlackUser] = {u.id: u for u in users}
        self.usergroups: dict[str, UserGroup] = {g.id: g for g in usergroups}
        self.post_interval = post_interval
        self.post_burst = max(1, post_burst)
        self.host = host
        self._port = port

        self.calls: list[SlackCall] = []
        self.responses: list[ResponseUrlPost] = []
        self.acks: list[dict[str, Any]] = []
        self._messages: dict[str, list[Message]] = {}
        self._response_urls: dict[str, _ResponseUrl] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._tickets: set[str] = set()
        self._sockets: list[web.WebSocketResponse] = []
        self.sockets_opened = 0  # Socket Mode connections accepted so far, closed ones included
        self._socket_opened = asyncio.Event()
        self._pending_acks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._last_ts_us = 0
        self._runner: web.AppRunner | None = None

        self._handlers = {
            "auth.test": self._auth_test,
            "apps.connections.open": self._apps_connections_open,
            "chat.postMessage": self._chat_post_message,
            "chat.update": self._chat_update,
            "chat.postEphemeral": self._chat_post_ephemeral,
            "users.info": self._users_info,
            "users.lookupByEmail": self._users_lookup_by_email,
            "usergroups.list": self._usergroups_list,
            "usergroups.users.list": self._usergroups_users_list,
            "views.publish": self._views_publish,
        }
        self.home_views: dict[str, dict[str, Any]] = {}  # user -> the Home tab the app last published

    # ---- lifecycle

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{url_id}", self._response)
        app.router.add_get("/socket-mode", self._socket_mode)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        await site.start()
        addr = self._runner.addresses[0]
        self._port = int(addr[1])

    async def stop(self) -> None:
        for fut in self._pending_acks.values():
            if not fut.done():
                fut.cancel()
        for ws in list(self._sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
        self._sockets.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeSlack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}"

    @property
    def api_url(self) -> str:
        # slack_sdk joins method names onto base_url with urljoin: the trailing slash matters.
        return f"{self.base_url}/api/"

    # ---- directory helpers

    def user(self, user_id: str) -> SlackUser:
        return self.users[user_id]

    def user_by_name(self, name: str) -> SlackUser:
        for u in self.users.values():
            if u.name == name:
                return u
        raise KeyError(name)

    def usergroup_by_handle(self, handle: str) -> UserGroup:
        handle = handle.lstrip("@")
        for g in self.usergroups.values():
            if g.handle == handle:
                return g
        raise KeyError(handle)

    # ---- assertions helpers

    def calls_to(self, method: str) -> list[SlackCall]:
        return [c for c in self.calls if c.method == method]

    def message(self, channel: str, ts: str) -> Message:
        for m in self._messages.get(channel, []):
            if m.ts == ts:
                return m
        raise KeyError(f"no message {ts} in {channel}")

    def messages(self, channel: str = DEFAULT_CHANNEL) -> list[Message]:
        """What the channel shows, in order: root messages (each with its thread replies, copies),
        ephemerals, and thread replies also sent to the channel (`is_reply` and `broadcast` set)."""
        log = [m for m in self._messages.get(channel, []) if not m.deleted]
        replies: dict[str, list[Message]] = {}
        for m in log:
            if m.is_reply and m.thread_ts is not None:
                replies.setdefault(m.thread_ts, []).append(replace(m, replies=[]))
        return [replace(m, replies=replies.get(m.ts, [])) for m in log if not m.is_reply or m.broadcast]

    def thread(self, channel: str, ts: str) -> list[Message]:
        for m in self.messages(channel):
            if m.ts == ts:
                return m.replies
        raise KeyError(f"no root message {ts} in {channel}")

    def channels(self) -> list[str]:
        return list(self._messages)

    def told(self, user: str) -> list[str]:
        """Every private text `user` was shown, by chat.postEphemeral or through a response_url."""
        return [
            m.text for ms in self._messages.values() for m in ms if m.ephemeral_to == user and not m.deleted
        ]

    def transcript(self, channel: str | None = None) -> str:
        """The conversation as plain text: roots, indented replies, [Buttons], (edited), ephemerals."""
        chans = [channel] if channel is not None else self.channels()
        out: list[str] = []
        for ch in chans:
            out.append(f"#{ch}")
            for m in self.messages(ch):
                out.extend(self._render(m, indent=""))
                for r in m.replies:
                    out.extend(self._render(r, indent="    "))
        return "\n".join(out)

    def _display_name(self, user_id: str) -> str:
        u = self.users.get(user_id)
        return u.name if u else user_id

    def _plain(self, text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            sigil, ref, label, url, url_label, bare = m.groups()
            if sigil == "@":
                return "@" + (label or self._display_name(ref))
            if sigil == "#":
                return "#" + (label or ref)
            if sigil == "!":
                if ref.startswith("subteam^"):
                    gid = ref.split("^", 1)[1]
                    g = self.usergroups.get(gid)
                    return label or ("@" + g.handle if g else "@" + gid)
                return "@" + (label or ref)
            if url is not None:
                return str(url_label)
            return str(bare)

        return _MENTION.sub(sub, text).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")

    def _block_lines(self, blocks: list[dict[str, Any]]) -> list[str]:
        lines: list[str] = []
        for b in blocks:
            kind = b.get("type")
            if kind in ("section", "header"):
                text = _text_of(b.get("text"))
                if text:
                    lines.extend(self._plain(text).splitlines())
                for f in b.get("fields") or []:
                    lines.extend(self._plain(_text_of(f)).splitlines())
                acc = b.get("accessory")
                if isinstance(acc, dict) and acc.get("type") == "button":
                    lines.append(f"[{_text_of(acc.get('text'))}]")
            elif kind == "context":
                parts = [self._plain(_text_of(e)) for e in b.get("elements") or [] if _text_of(e)]
                if parts:
                    lines.append(" · ".join(parts))
            elif kind == "actions":
                labels = [
                    f"[{_text_of(e.get('text'))}]"
                    for e in b.get("elements") or []
                    if isinstance(e, dict) and e.get("type") == "button"
                ]
                if labels:
                    lines.append(" ".join(labels))
            elif kind == "divider":
                lines.append("---")
        return lines

    def _render(self, m: Message, indent: str) -> list[str]:
        body = self._block_lines(m.blocks) if m.blocks else self._plain(m.text).splitlines()
        if not body:
            body = [""]
        who = self._display_name(m.user)
        prefix = f"{indent}{who}: "
        if m.ephemeral_to is not None:
            prefix = f"{indent}(only visible to {self._display_name(m.ephemeral_to)}) {who}: "
        lines = [prefix + body[0]] + [indent + "  " + line for line in body[1:]]
        if m.edited:
            lines[-1] += " (edited)"
        return lines

    # ---- response_url

    def response_url(
        self, *, channel: str = DEFAULT_CHANNEL, user_id: str = "U0ALICE", message_ts: str | None = None
    ) -> str:
        """Mint a response_url for a slash command (no message) or a click on message `message_ts`."""
        url_id = secrets.token_hex(8)
        self._response_urls[url_id] = _ResponseUrl(channel=channel, user_id=user_id, message_ts=message_ts)
        return f"{self.base_url}/response/{url_id}"

    def responses_to(self, url: str) -> list[ResponseUrlPost]:
        url_id = url.rsplit("/", 1)[-1]
        return [r for r in self.responses if r.url_id == url_id]

    # ---- payload builders bound to this workspace (real response_urls, real messages)

    def slash_payload(
        self,
        text: str,
        *,
        user_id: str = "U0ALICE",
        channel_id: str = DEFAULT_CHANNEL,
        command: str = "/funnelcake",
    ) -> dict[str, str]:
        return slash_command_payload(
            text=text,
            command=command,
            user_id=user_id,
            user_name=self._display_name(user_id),
            channel_id=channel_id,
            response_url=self.response_url(channel=channel_id, user_id=user_id),
        )

    def action_payload(
        self, channel: str, ts: str, action_id: str, *, user_id: str = "U0ALICE"
    ) -> dict[str, Any]:
        """A click by `user_id` on the button `action_id` of the message as it currently stands."""
        msg = self.message(channel, ts)
        for button in msg.buttons():
            if button.get("action_id") == action_id:
                break
        else:
            labels = [b.get("action_id") for b in msg.buttons()]
            raise KeyError(f"message {ts} has no button {action_id!r} (buttons: {labels})")
        message: dict[str, Any] = {
            "type": "message",
            "user": msg.user,
            "bot_id": BOT_ID,
            "ts": msg.ts,
            "text": msg.text,
            "blocks": copy.deepcopy(msg.blocks or []),
            "team": TEAM_ID,
        }
        if msg.thread_ts:
            message["thread_ts"] = msg.thread_ts
        return block_actions_payload(
            action_id=action_id,
            value=str(button.get("value", "")),
            block_id=str(button.get("block_id", "")),
            label=_text_of(button.get("text")),
            message=message,
            user_id=user_id,
            user_name=self._display_name(user_id),
            channel_id=channel,
            response_url=self.response_url(channel=channel, user_id=user_id, message_ts=ts),
        )

    def signed_slash_command(
        self, text: str, *, age: float = 0, forge: bool = False, **kw: Any
    ) -> tuple[bytes, dict[str, str]]:
        """A signed HTTP-mode slash command whose response_url points at this server."""
        body = urlencode(self.slash_payload(text, **kw)).encode()
        return body, signed_headers(body, self.signing_secret, age=age, forge=forge)

    def signed_click(
        self,
        channel: str,
        ts: str,
        action_id: str,
        *,
        user_id: str = "U0ALICE",
        age: float = 0,
        forge: bool = False,
    ) -> tuple[bytes, dict[str, str]]:
        """A signed HTTP-mode button click on a message this server holds."""
        payload = self.action_payload(channel, ts, action_id, user_id=user_id)
        body = urlencode({"payload": json.dumps(payload, separators=(",", ":"))}).encode()
        return body, signed_headers(body, self.signing_secret, age=age, forge=forge)

    # ---- Socket Mode

    async def wait_connected(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a test-facing deadline
        """Wait until an app has opened a Socket Mode connection."""
        try:
            await asyncio.wait_for(self._socket_opened.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"no Socket Mode connection within {timeout} s") from None

    @property
    def socket_connections(self) -> int:
        return sum(1 for ws in self._sockets if not ws.closed)

    async def send_envelope(
        self,
        type: str,
        payload: Mapping[str, Any],
        *,
        timeout: float = ACK_DEADLINE,  # noqa: ASYNC109 - Slack's ack deadline is the contract simulated
    ) -> dict[str, Any]:
        """Deliver an envelope to the connected app and return its ack ({"envelope_id", "payload"?}).

        Raises TimeoutError when no ack arrives within `timeout` (Slack's deadline is 3 s)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self.wait_connected(timeout)
        live = [ws for ws in self._sockets if not ws.closed]
        if not live:
            raise ConnectionError("the Socket Mode connection closed before the envelope could be sent")
        envelope_id = str(uuid.uuid4())
        envelope = {
            "envelope_id": envelope_id,
            "type": type,
            "payload": dict(payload),
            "accepts_response_payload": type != "events_api",
        }
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending_acks[envelope_id] = fut
        try:
            await live[-1].send_str(json.dumps(envelope))
            remaining = max(0.0, deadline - loop.time())
            try:
                return await asyncio.wait_for(fut, remaining)
            except TimeoutError:
                raise TimeoutError(
                    f"the app did not ack {type} envelope {envelope_id} within {timeout} s"
                ) from None
        finally:
            self._pending_acks.pop(envelope_id, None)

    @staticmethod
    def event_callback(event: Mapping[str, Any]) -> dict[str, Any]:
        """The Events API wrapper Slack puts around an event."""
        return {
            "type": "event_callback",
            "team_id": TEAM_ID,
            "api_app_id": APP_ID,
            "event": dict(event),
            "event_id": f"Ev{secrets.token_hex(5).upper()}",
            "event_time": int(time.time()),
        }

    async def send_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """An Events API event (e.g. `{"type": "app_home_opened", "user": …, "tab": "home"}`) over Socket Mode."""
        return await self.send_envelope("events_api", self.event_callback(event))

    def signed_event(self, event: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The same event as a signed HTTP-mode POST to /slack/events (a JSON body)."""
        body = json.dumps(self.event_callback(event), separators=(",", ":")).encode()
        return body, signed_headers(body, self.signing_secret, content_type="application/json")

    async def send_slash(self, text: str, **kw: Any) -> dict[str, Any]:
        return await self.send_envelope("slash_commands", self.slash_payload(text, **kw))

    async def click(
        self, channel: str, ts: str, action_id: str, *, user_id: str = "U0ALICE"
    ) -> dict[str, Any]:
        return await self.send_envelope(
            "interactive", self.action_payload(channel, ts, action_id, user_id=user_id)
        )

    async def request_reconnect(self, reason: str = "refresh_requested") -> None:
        """Ask connected apps to reconnect, as Slack does every few hours."""
        for ws in self._sockets:
            if not ws.closed:
                await ws.send_str(json.dumps({"type": "disconnect", "reason": reason, "debug_info": {}}))

    async def _socket_mode(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            return web.json_response({"ok": False, "error": "invalid_ticket"}, status=401)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.append(ws)
        self.sockets_opened += 1
        await ws.send_str(
            json.dumps(
                {
                    "type": "hello",
                    "num_connections": self.socket_connections,
                    "debug_info": {"host": "applink-testbed", "approximate_connection_time": 18060},
                    "connection_info": {"app_id": APP_ID},
                }
            )
        )
        self._socket_opened.set()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(data, dict) and "envelope_id" in data:
                    self.acks.append(data)
                    fut = self._pending_acks.get(str(data["envelope_id"]))
                    if fut is not None and not fut.done():
                        fut.set_result(data)
        finally:
            with contextlib.suppress(ValueError):
                self._sockets.remove(ws)
            if not any(not w.closed for w in self._sockets):
                self._socket_opened.clear()
        return ws

    # ---- Web API

    def _next_ts(self) -> str:
        now_us = time.time_ns() // 1000
        self._last_ts_us = max(now_us, self._last_ts_us + 1)
        return f"{self._last_ts_us // 1_000_000}.{self._last_ts_us % 1_000_000:06d}"

    async def _read_params(self, request: web.Request) -> tuple[dict[str, Any], str | None]:
        params: dict[str, Any] = dict(request.query)
        body_token: str | None = params.pop("token", None)
        if request.method == "POST" and request.can_read_body:
            ctype = request.content_type
            if ctype == "application/json":
                try:
                    data = await request.json()
                except ValueError:
                    raise SlackApiFailure("invalid_json") from None
                if not isinstance(data, dict):
                    raise SlackApiFailure("invalid_json")
                # Slack ignores a token inside a JSON body: it must come as a bearer header.
                data.pop("token", None)
                params.update(data)
            else:
                form = await request.post()
                for k in form:
                    v = form.get(k)
                    if isinstance(v, str):
                        params[k] = v
                body_token = params.pop("token", body_token)
        for key in ("blocks", "attachments"):
            if isinstance(params.get(key), str):
                try:
                    params[key] = json.loads(params[key])
                except ValueError:
                    raise SlackApiFailure(f"invalid_{key}_format") from None
        return params, body_token

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        auth = request.headers.get("Authorization", "")
        header_token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        call = SlackCall(method=method, params={}, token=header_token, at=time.time())
        self.calls.append(call)
        headers: dict[str, str] = {}
        try:
            params, body_token = await self._read_params(request)
            call.params = params
            call.token = header_token or body_token
            handler = self._handlers.get(method)
            if handler is None:
                raise SlackApiFailure("unknown_method", status=404)
            self._check_token(method, call.token)
            if method == "chat.postMessage":
                self._rate_limit(str(params.get("channel", "")), headers)
            result = handler(params)
            call.response = {"ok": True, **result}
        except SlackApiFailure as e:
            call.status = e.status
            call.response = {"ok": False, "error": e.error, **e.extra}
        return web.json_response(call.response, status=call.status, headers=headers)

    def _check_token(self, method: str, token: str | None) -> None:
        if not token:
            raise SlackApiFailure("not_authed")
        if method == "apps.connections.open":
            if token == self.bot_token:
                raise SlackApiFailure("not_allowed_token_type")
            if token != self.app_token:
                raise SlackApiFailure("invalid_auth")
            return
        if token == self.app_token:
            raise SlackApiFailure("not_allowed_token_type")
        if token != self.bot_token:
            raise SlackApiFailure("invalid_auth")

    def _rate_limit(self, channel: str, headers: dict[str, str]) -> None:
        if self.post_interval is None or self.post_interval <= 0:
            return
        now = time.monotonic()
        b = self._buckets.get(channel)
        if b is None:
            b = self._buckets[channel] = _Bucket(tokens=float(self.post_burst), updated=now)
        b.tokens = min(float(self.post_burst), b.tokens + (now - b.updated) / self.post_interval)
        b.updated = now
        if b.tokens < 1.0:
            wait = (1.0 - b.tokens) * self.post_interval
            # Slack sends whole seconds; never 0, or clients would retry in a tight loop.
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
            raise SlackApiFailure("ratelimited", status=429)
        b.tokens -= 1.0

    @staticmethod
    def _channel(params: Mapping[str, Any]) -> str:
        channel = params.get("channel")
        if not isinstance(channel, str) or not channel:
            raise SlackApiFailure("channel_not_found")
        return channel

    @staticmethod
    def _content(
        params: Mapping[str, Any], *, required: bool = True
    ) -> tuple[str, list[dict[str, Any]] | None]:
        text = params.get("text")
        text = text if isinstance(text, str) else ""
        blocks = params.get("blocks")
        if blocks is not None:
            problems = validate_blocks(blocks)
            if problems:
                raise SlackApiFailure(
                    "invalid_blocks", errors=problems, response_metadata={"messages": problems}
                )
        if required and not text and not blocks and not params.get("attachments"):
            raise SlackApiFailure("no_text")
        if len(text) > MAX_MESSAGE_TEXT:
            raise SlackApiFailure("msg_too_long")
        return text, (blocks if blocks else None)

    @staticmethod
    def _wire(m: Message) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "message",
            "user": m.user,
            "bot_id": BOT_ID,
            "app_id": APP_ID,
            "ts": m.ts,
            "text": m.text,
            "team": TEAM_ID,
        }
        if m.blocks:
            out["blocks"] = copy.deepcopy(m.blocks)
        if m.thread_ts:
            out["thread_ts"] = m.thread_ts
        return out

    def _auth_test(self, params: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "url": f"https://{TEAM_DOMAIN}.slack.com/",
            "team": TEAM_DOMAIN,
            "user": BOT_NAME,
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": False,
        }

    def _apps_connections_open(self, params: Mapping[str, Any]) -> dict[str, Any]:
        ticket = str(uuid.uuid4())
        self._tickets.add(ticket)
        return {"url": f"ws://{self.host}:{self._port}/socket-mode?ticket={ticket}&app_id={APP_ID}"}

    def _chat_post_message(self, params: Mapping[str, Any]) -> dict[str, Any]:
        channel = self._channel(params)
        text, blocks = self._content(params)
        thread_ts = params.get("thread_ts") or None
        if thread_ts is not None:
            thread_ts = str(thread_ts)
            try:
                parent = self.message(channel, thread_ts)
            except KeyError:
                raise SlackApiFailure("thread_not_found") from None
            # A reply to a reply lands in the parent's thread.
            thread_ts = parent.thread_ts or parent.ts
        m = Message(
            ts=self._next_ts(),
            channel=channel,
            user=BOT_USER_ID,
            text=text,
            blocks=blocks,
            thread_ts=thread_ts,
            broadcast=thread_ts is not None and self._flag(params.get("reply_broadcast")),
        )
        self._messages.setdefault(channel, []).append(m)
        return {"channel": channel, "ts": m.ts, "message": self._wire(m)}

    def _views_publish(self, params: Mapping[str, Any]) -> dict[str, Any]:
        user = params.get("user_id")
        if not isinstance(user, str) or user not in self.users:
            raise SlackApiFailure("user_not_found")
        view = params.get("view")
        if isinstance(view, str):
            try:
                view = json.loads(view)
            except ValueError:
                raise SlackApiFailure("invalid_arguments") from None
        if not isinstance(view, dict) or view.get("type") != "home":
            raise SlackApiFailure("invalid_arguments")
        blocks = view.get("blocks") or []
        problems = (
            validate_blocks(blocks)
            if len(blocks) <= 100
            else ["no more than 100 items allowed [json-pointer:/view/blocks]"]
        )
        if problems:
            raise SlackApiFailure("invalid_arguments", response_metadata={"messages": problems})
        self.home_views[user] = view
        return {"view": {"id": f"V{secrets.token_hex(5).upper()}", **view}}

    def _chat_update(self, params: Mapping[str, Any]) -> dict[str, Any]:
        channel = self._channel(params)
        ts = str(params.get("ts") or "")
        try:
            m = self.message(channel, ts)
        except KeyError:
            raise SlackApiFailure("message_not_found") from None
        if m.ephemeral_to is not None or m.deleted:
            raise SlackApiFailure("message_not_found")
        if m.user != BOT_USER_ID:
            raise SlackApiFailure("cant_update_message")
        text, blocks = self._content(params, required=False)
        if "text" in params:
            m.text = text
        # chat.update keeps the previous blocks when none are given; [] removes them.
        if "blocks" in params:
            m.blocks = blocks
        m.edited = True
        return {"channel": channel, "ts": m.ts, "text": m.text, "message": self._wire(m)}

    def _chat_post_ephemeral(self, params: Mapping[str, Any]) -> dict[str, Any]:
        channel = self._channel(params)
        user = str(params.get("user") or "")
        if user not in self.users:
            raise SlackApiFailure("user_not_found")
        text, blocks = self._content(params)
        thread_ts = params.get("thread_ts") or None
        m = Message(
            ts=self._next_ts(),
            channel=channel,
            user=BOT_USER_ID,
            text=text,
            blocks=blocks,
            thread_ts=str(thread_ts) if thread_ts else None,
            ephemeral_to=user,
        )
        self._messages.setdefault(channel, []).append(m)
        return {"message_ts": m.ts}

    def _user_json(self, u: SlackUser) -> dict[str, Any]:
        return {
            "id": u.id,
            "team_id": TEAM_ID,
            "name": u.name,
            "deleted": u.deleted,
            "real_name": u.real_name,
            "is_bot": u.is_bot,
            "is_admin": False,
            "tz": "Europe/Paris",
            "profile": {"real_name": u.real_name, "display_name": u.name, "team": TEAM_ID, "email": u.email},
        }

    def _users_info(self, params: Mapping[str, Any]) -> dict[str, Any]:
        u = self.users.get(str(params.get("user") or ""))
        if u is None:
            raise SlackApiFailure("user_not_found")
        return {"user": self._user_json(u)}

    def _users_lookup_by_email(self, params: Mapping[str, Any]) -> dict[str, Any]:
        wanted = str(params.get("email") or "").casefold()
        for u in self.users.values():
            if u.email.casefold() == wanted and not u.deleted:
                return {"user": self._user_json(u)}
        raise SlackApiFailure("users_not_found")

    @staticmethod
    def _flag(value: Any) -> bool:
        return value is True or (isinstance(value, str) and value.lower() in ("true", "1"))

    def _usergroups_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        include_users = self._flag(params.get("include_users"))
        groups = []
        for g in self.usergroups.values():
            item: dict[str, Any] = {
                "id": g.id,
                "team_id": TEAM_ID,
                "is_usergroup": True,
                "name": g.name,
                "handle": g.handle,
                "user_count": len(g.users),
            }
            if include_users:
                item["users"] = list(g.users)
            groups.append(item)
        return {"usergroups": groups}

    def _usergroups_users_list(self, params: Mapping[str, Any]) -> dict[str, Any]:
        g = self.usergroups.get(str(params.get("usergroup") or ""))
        if g is None:
            raise SlackApiFailure("no_such_subteam")
        return {"users": list(g.users)}

    # ---- response_url endpoint

    async def _response(self, request: web.Request) -> web.Response:
        url_id = request.match_info["url_id"]
        try:
            body = await request.json()
        except ValueError:
            body = None
        post = ResponseUrlPost(
            url_id=url_id, body=body if isinstance(body, dict) else {}, at=time.time(), status=200
        )
        self.responses.append(post)
        target = self._response_urls.get(url_id)
        try:
            if target is None:
                raise SlackApiFailure("expired_url", status=404)
            if not isinstance(body, dict):
                raise SlackApiFailure("invalid_payload", status=400)
            target.uses += 1
            if target.uses > MAX_RESPONSE_URL_USES:
                raise SlackApiFailure("used_url", status=404)
            self._apply_response(target, body)
        except SlackApiFailure as e:
            post.status, post.error = e.status, e.error
            return web.json_response({"ok": False, "error": e.error, **e.extra}, status=e.status)
        return web.json_response({"ok": True})

    def _apply_response(self, target: _ResponseUrl, body: dict[str, Any]) -> None:
        if self._flag(body.get("delete_original")):
            if target.message_ts is None:
                raise SlackApiFailure("no_original_message", status=404)
            self.message(target.channel, target.message_ts).deleted = True
            return
        text, blocks = self._content(body)
        if self._flag(body.get("replace_original")) and target.message_ts is not None:
            # Unlike chat.update (which keeps omitted blocks), a replacement is the whole new message.
            m = self.message(target.channel, target.message_ts)
            m.text, m.blocks, m.edited = text, blocks, True
            return
        thread_ts = body.get("thread_ts")
        m = Message(
            ts=self._next_ts(),
            channel=target.channel,
            user=BOT_USER_ID,
            text=text,
            blocks=blocks,
            thread_ts=str(thread_ts) if thread_ts else None,
            # A slash command's response is ephemeral unless the app says in_channel.
            ephemeral_to=None if body.get("response_type") == "in_channel" else target.user_id,
        )
        self._messages.setdefault(target.channel, []).append(m)


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    """A started local Slack with the default directory; stopped after the test."""
    async with FakeSlack() as s:
        yield s
