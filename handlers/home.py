"""The App Home tab: a board of the envs (what runs where, locks, running deploys, open incidents, the last
deploy) with the same buttons the threads have, published when someone opens it and again when a deploy
ends for everyone who has looked."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from bot.errors import BotError
from bot.ledger.models import DeployRecord, IncidentRecord, ManualLock
from bot.service import DeployService
from bot.settings import Environment, Service
from handlers import blocks as bk
from handlers import buttons as drawn

log = logging.getLogger(__name__)

READ_LIMIT = 10.0  # the board is drawn within this, whatever hangs (an unreadable part says so)


async def home_view(service: DeployService) -> dict[str, Any]:
    """The Home tab's view: one section per env, from the overlays and the ledger only (no cluster reads,
    so it opens at once; `status` is the deep look)."""
    try:
        async with asyncio.timeout(READ_LIMIT):
            board = await service.board()
    except (BotError, TimeoutError) as e:
        why = e.message if isinstance(e, BotError) else f"no answer within {READ_LIMIT:.0f} s"
        return _view([bk.header("funnelcake"), bk.section(f"🔴 The board could not be read: {bk.esc(why)}")])
    blocks: list[bk.Block] = [bk.header("funnelcake")]
    for env in service.config.environments:
        blocks += _env(
            env,
            board.tags.get(env.name),
            locks=board.locks,
            running=board.running,
            incidents=board.incidents,
            last=board.last.get(env.name) or [],
        )
    blocks.append(
        bk.context(
            f"Drawn {bk.when(datetime.now(UTC))} · `/funnelcake status` for the clusters and registries"
        )
    )
    return _view(blocks)


def _env(
    env: Environment,
    tags: dict[Service, str] | BotError | None,
    *,
    locks: list[ManualLock],
    running: list[DeployRecord],
    incidents: list[IncidentRecord],
    last: list[DeployRecord],
) -> list[bk.Block]:
    lines = [f"*{bk.esc(env.name)}*"]
    api: str | None = None
    if isinstance(tags, BotError) or tags is None:
        why = tags.message if isinstance(tags, BotError) else "not read"
        lines.append(f"🔴 overlays unreadable: {bk.esc(why)}")
    else:
        api = tags.get(Service.API)
        lines.append(" · ".join(f"{s.value} `{bk.esc(t)}`" for s, t in sorted(tags.items())))
    for lock in locks:
        if lock.env == env.name:
            lines.append(
                f"🔒 locked by {bk.mention(lock.user)} since {bk.when(lock.since)}: {bk.esc(lock.reason)}"
            )
    for record in running:
        if env.name in record.envs:
            lines.append(
                f"⏳ {bk.esc(bk.title(record))} by {bk.mention(record.requester)} ({record.state.value})"
            )
    for incident in incidents:
        if incident.env == env.name:
            lines.append(f"🚨 {bk.esc(incident.title)} since {bk.when(incident.opened_at)}")
    if last:
        r = last[0]
        lines.append(
            f"Last: `{r.id}` {r.kind.value} `{bk.esc(r.short or r.ref)}` — {r.state.value}, {bk.when(r.created_at)}"
        )
    blocks = [bk.section("\n".join(lines))]
    if api:
        blocks.append(
            bk.actions(
                f"home:{env.name}",
                bk.button(
                    f"Roll back {env.name}",
                    f"rollback-{env.name}",
                    drawn.command(f"rollback {env.name}", ran=api),
                    "danger",
                    confirm=bk.rollback_confirm(env.name),
                ),
            )
        )
    blocks.append(bk.divider())
    return blocks


def _view(blocks: list[bk.Block]) -> dict[str, Any]:
    return {"type": "home", "blocks": bk.fit(blocks)}
