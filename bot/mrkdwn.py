"""Text bound for Slack's mrkdwn: escaping what a person or a system wrote, and naming a user.

The lowest layer, with no imports of the bot's own: the command grammar, the log redaction, the ledger's
messages, the policy's refusals and the Slack front all write Slack text through these two helpers.
"""

from __future__ import annotations

import re

# A Slack user ID as the API gives it: U… or W… (Enterprise Grid), upper-case letters and digits.
SLACK_USER_RE = re.compile(r"^[UW][A-Z0-9]{2,}$")


def escape(text: str) -> str:
    """`<`, `>` and `&` as Slack's entities, so user or system text cannot become a link or a mention."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def mention(user: str) -> str:
    """A Slack user ID as a mention (`<@U…>`: a name in Slack, still readable in a terminal); anything else
    (a group handle, `*`, an OS user) as given. Plain text: escape the message around it at the edge."""
    return f"<@{user}>" if SLACK_USER_RE.match(user) else user
