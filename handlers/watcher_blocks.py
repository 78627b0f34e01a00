"""The watcher's incident messages: the diagnosis, its one-click fix while open, how long it lasted once closed.

Split out of handlers.blocks, which re-exports `incident_blocks`.
"""

from __future__ import annotations

from bot.ledger.models import IncidentRecord
from handlers import buttons as drawn
from handlers.blockkit import Block, actions, button, context, esc, fit, rollback_confirm, section, when

# ---- incidents (the watcher) ----------------------------------------------------------------------------

_INCIDENT_ICONS = {
    "pods_failing": "🚨",
    "degraded": "🚨",
    "sync_failed": "🚨",
    "unreachable": "📡",
    "endpoint_failing": "📡",
    "out_of_sync": "⚠️",
    "hand_edit": "✍️",
    "behind_production": "🐢",
}


def incident_blocks(incident: IncidentRecord, *, lasted: float | None = None) -> tuple[str, list[Block]]:
    """The incident's message (fallback text and blocks): the diagnosis and its one-click fix while it is
    open; once closed, how long it lasted and no buttons (a notice keeps its Roll back)."""
    d = incident.detail
    icon = _INCIDENT_ICONS.get(incident.kind, "⚠️")
    notice = incident.kind == "hand_edit"
    if lasted is not None and not notice:
        text = f"✅ Recovered after {_duration(lasted)}: {incident.title}"
        return text, [section(f"✅ *Recovered* after {_duration(lasted)}: {esc(incident.title)}")]
    again = int(d.get("reopened", 0) or 0)
    lead = f"{icon} *{esc(incident.env)}*: {esc(incident.title)}"
    if again:
        lead += f" _(back again, {again + 1}{'nd' if again == 1 else 'rd' if again == 2 else 'th'} time)_"
    blocks = [section(lead)]
    if d.get("cause"):
        blocks.append(section(f"*Cause*: {esc(str(d['cause']))}"))
    if d.get("evidence"):
        blocks.append(section("*Evidence*\n> " + esc(str(d["evidence"])).replace("\n", "\n> ")))
    if d.get("fix"):
        blocks.append(section(f"*Fix*: {esc(str(d['fix']))}"))
    buttons = []
    for action in d.get("actions") or ():
        if action == "rollback":
            buttons.append(
                button(
                    f"Roll back {incident.env}",
                    "rollback",
                    drawn.command(f"rollback {incident.env}"),
                    "danger",
                    confirm=rollback_confirm(incident.env),
                )
            )
        elif action == "rebuild" and d.get("tag"):
            # the incident's message closes (buttons gone) when it ends, so it carries no `ran` to compare
            buttons.append(
                button(f"Rebuild {d['tag']}", "rebuild", drawn.command(f"deploy {incident.env} {d['tag']}"))
            )
        elif action == "catchup" and d.get("target"):
            buttons.append(
                button(
                    f"Catch up to {d['target']}",
                    "catchup",
                    drawn.command(
                        f"deploy {incident.env} {d['target']}", ran=str(d.get("tag") or "") or None
                    ),
                )
            )
    if buttons:
        blocks.append(actions(f"incident:{incident.id}", *buttons))
    blocks.append(context(f"Seen by the watcher since {when(incident.opened_at)}"))
    return f"{icon} {incident.env}: {incident.title}", fit(blocks)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
