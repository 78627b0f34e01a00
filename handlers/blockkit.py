"""Block Kit primitives shared by every message builder: escaping, times, sections, buttons, Slack's limits.

Split out of handlers.blocks (which re-exports these names, so `bk.section` and the rest keep working).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from bot import mrkdwn
from bot.mrkdwn import SLACK_USER_RE, escape

Block = dict[str, Any]

MAX_BLOCKS = 50
MAX_SECTION = 3000
MAX_BUTTON_VALUE = 2000


# `bk.esc` is the one mrkdwn escape, under the short name every message builder uses.
esc = escape


def when(at: datetime | str) -> str:
    """A time each reader sees in their own zone and format (`<!date^…>`), with a UTC fallback for clients
    that cannot render it; an unreadable value is shown as given."""
    if isinstance(at, str):
        try:
            at = datetime.fromisoformat(at)
        except ValueError:
            return esc(str(at))
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    fallback = f"{at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
    return f"<!date^{int(at.timestamp())}^{{date_short_pretty}} at {{time}}|{fallback}>"


_ESCAPED_MENTION = re.compile(r"&lt;@(" + SLACK_USER_RE.pattern.strip("^$") + r")&gt;")


def esc_keep_mentions(text: str) -> str:
    """Escape like `esc`, but a `<@U…>` mention the bot wrote (who refused, who holds a lock) resolves."""
    return _ESCAPED_MENTION.sub(r"<@\1>", esc(text))


def clip(text: str, limit: int = MAX_SECTION - 100) -> str:
    return text if len(text) <= limit else text[: limit - 20].rstrip() + "\n… (truncated)"


def section(text: str) -> Block:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(text)}}


def context(text: str) -> Block:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": clip(text, 2900)}]}


def divider() -> Block:
    return {"type": "divider"}


def header(text: str) -> Block:
    return {"type": "header", "text": {"type": "plain_text", "text": text[:150], "emoji": True}}


def button(label: str, action_id: str, value: str, style: str | None = None, *, confirm: str = "") -> Block:
    """A button; a `danger` one must say, in a confirm dialog, what clicking it will do."""
    b: Block = {
        "type": "button",
        "text": {"type": "plain_text", "text": label[:75], "emoji": True},
        "action_id": action_id,
        "value": value[:MAX_BUTTON_VALUE],
    }
    if style:
        b["style"] = style
    if style == "danger" and not confirm:
        raise ValueError(f"the danger button {label!r} needs a confirm text saying what it will do")
    if confirm:
        b["confirm"] = {
            "title": {"type": "plain_text", "text": f"{label[:90]}?"},
            "text": {"type": "mrkdwn", "text": confirm[:300]},
            "confirm": {"type": "plain_text", "text": label[:30]},
            "deny": {"type": "plain_text", "text": "Not now"},
            "style": "danger",
        }
    return b


def rollback_confirm(env: str) -> str:
    return (
        f"Roll *{esc(env)}* back to the last tag the bot deployed there successfully: its overlays change in git "
        "and Argo CD syncs the cluster. Migrations are not reverted."
    )


def actions(block_id: str, *buttons: Block) -> Block:
    return {"type": "actions", "block_id": block_id, "elements": list(buttons)[:25]}


def fit(blocks: list[Block]) -> list[Block]:
    """Keep a message under Slack's block limit, saying what was left out."""
    if len(blocks) <= MAX_BLOCKS:
        return blocks
    kept = blocks[: MAX_BLOCKS - 1]
    return [*kept, context(f"… {len(blocks) - len(kept)} more blocks not shown")]


def mention(user: str) -> str:
    """A user for mrkdwn: the mention of a Slack ID, anything else escaped."""
    return esc_keep_mentions(mrkdwn.mention(user))
