"""What a button carries: the command it stands for, in the typed grammar, and the state it was drawn for.

A click is read back through `bot.commands.parse` like typed text, so a tampered value gets the same
checks (and the same refusals) as a typed command; `ran` is the tag the env ran when the button was
drawn, so a click on a stale message is refused instead of acting on whatever the env runs now.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MAX_VALUE = 2000  # Slack's limit for a button value
_DEPLOY_ID_RE = re.compile(r"^[a-z0-9-]{1,16}$")


@dataclass(frozen=True)
class Drawn:
    command: str
    ran: str | None = None


def command(text: str, *, ran: str | None = None) -> str:
    value = {"cmd": text} if ran is None else {"cmd": text, "ran": ran}
    return json.dumps(value, separators=(",", ":"))


def read(value: str) -> Drawn | None:
    """The button's command and context, or None when the value is not one the bot draws."""
    if len(value) > MAX_VALUE:
        return None
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("cmd"), str):
        return None
    ran = data.get("ran")
    if ran is not None and not isinstance(ran, str):
        return None
    return Drawn(data["cmd"], ran)


def deploy_id(value: str) -> str | None:
    """Approve, Deny and Cancel carry the deploy they were drawn for; the ledger holds its state."""
    return value if _DEPLOY_ID_RE.match(value) else None
