"""The watcher's incidents in Slack: one message per incident in the env's alerts channel, updated while it
lasts and closed with how long it lasted."""

from __future__ import annotations

import logging
from datetime import timedelta

from slack_sdk.web.async_client import AsyncWebClient

from bot.ledger.models import IncidentRecord
from bot.settings import FunnelcakeConfig
from handlers import blocks as bk

log = logging.getLogger(__name__)


class SlackIncidents:
    """The watcher's `IncidentNotifier` for Slack."""

    def __init__(self, client: AsyncWebClient, config: FunnelcakeConfig) -> None:
        self.client = client
        self.config = config
        self._nowhere: set[str] = set()

    async def opened(self, incident: IncidentRecord) -> tuple[str, str] | None:
        channel = self.config.alerts_channel(self.config.env(incident.env))
        if channel is None:
            if incident.env not in self._nowhere:
                self._nowhere.add(incident.env)
                log.warning(
                    "incident in %s not posted: set watch.channel or the env's alerts_channel", incident.env
                )
            return None
        text, blocks = bk.incident_blocks(incident)
        resp = await self.client.chat_postMessage(channel=channel, text=text, blocks=blocks)
        return str(resp["channel"]), str(resp["ts"])

    async def updated(self, incident: IncidentRecord) -> None:
        if incident.channel and incident.message_ts:
            text, blocks = bk.incident_blocks(incident)
            await self.client.chat_update(
                channel=incident.channel, ts=incident.message_ts, text=text, blocks=blocks
            )

    async def closed(self, incident: IncidentRecord, lasted: timedelta) -> None:
        if incident.channel and incident.message_ts:
            text, blocks = bk.incident_blocks(incident, lasted=lasted.total_seconds())
            await self.client.chat_update(
                channel=incident.channel, ts=incident.message_ts, text=text, blocks=blocks
            )
