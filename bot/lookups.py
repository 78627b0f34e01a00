"""What the deploy service reads without changing anything: drift, the Home tab's board, deploys, history,
locks, the dirty migration last reported, the overlays' tags and where a rollback goes. A layer of
DeployService, split out of bot/service.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from bot.drift import DriftReport, build_report
from bot.errors import BotError, PermanentError
from bot.ledger.models import (
    DeployRecord,
    IncidentRecord,
    ManualLock,
    StepState,
)
from bot.service_core import ServiceCore
from bot.settings import Service


@dataclass(frozen=True)
class Board:
    """What the Home tab shows, from the overlays and the ledger only (no cluster reads)."""

    tags: dict[str, dict[Service, str] | BotError]  # env -> its overlays' tags, or why they could not be read
    locks: list[ManualLock]
    running: list[DeployRecord]
    incidents: list[IncidentRecord]  # the open ones
    last: dict[str, list[DeployRecord]]  # env -> its newest deploy (none yet: empty)


class Lookups(ServiceCore):
    async def status(self) -> DriftReport:
        return await build_report(self.deps)

    async def board(self) -> Board:
        envs = self.config.environments
        ledger = self.deps.ledger
        tags, locks, running, incidents = await asyncio.gather(
            self.deps.gitops.read_tags_each(envs),
            ledger.locks(),
            ledger.in_flight(),
            ledger.incidents(open_only=True),
        )
        last = {env.name: await ledger.history(env.name, 1) for env in envs}
        return Board(tags, locks, running, incidents, last)

    async def get_deploy(self, deploy_id: str) -> DeployRecord:
        """The deploy's record; UnknownDeploy if there is none."""
        return await self.deps.ledger.get_deploy(deploy_id)

    async def record_thread(self, deploy_id: str, channel: str, thread_ts: str) -> DeployRecord:
        """Where the deploy's Slack thread is, so every bot and the CLI post to that one thread."""
        return await self.deps.ledger.update_deploy(deploy_id, channel=channel, thread_ts=thread_ts)

    async def lock_on(self, env_name: str) -> ManualLock | None:
        """The env's manual lock, if it has one."""
        return next((lock for lock in await self.deps.ledger.locks() if lock.env == env_name), None)

    async def history(
        self, env_name: str | None = None, limit: int = 10, *, before: str | None = None
    ) -> list[DeployRecord]:
        return await self.deps.ledger.history(env_name, limit, before=before)

    async def history_page(
        self, env_name: str | None = None, limit: int = 10, *, before: str | None = None
    ) -> tuple[list[DeployRecord], bool]:
        """A page of history, newest first, and whether older deploys remain (the next page: `before` = its last id)."""
        return await self.deps.ledger.history_page(env_name, limit, before=before)

    async def lock(self, env_name: str, user: str, reason: str) -> ManualLock:
        self.config.env(env_name)
        return await self.deps.ledger.lock(env_name, user, reason)

    async def unlock(self, env_name: str, user: str) -> ManualLock | None:
        self.config.env(env_name)
        return await self.deps.ledger.unlock(env_name, user)

    async def reported_dirty(self, env_name: str) -> tuple[int, str] | None:
        """The dirty version the newest migration run in `env` reported, and the commit whose migrate image
        ran it (recovery must use that image: an older one does not know the version), from the audit trail."""
        for record in await self.deps.ledger.history(env_name, 20):
            for step in reversed(await self.deps.ledger.steps(record.id)):
                if step.step not in ("migrate", "force-migrate") or not step.detail:
                    continue
                if step.detail.get("env", env_name) != env_name:
                    continue
                if step.state is StepState.FAILED and step.detail.get("dirty_version") is not None:
                    return int(step.detail["dirty_version"]), record.short or ""
                if step.state in (StepState.OK, StepState.FAILED):
                    return None  # the newest run either cleaned up or failed some other way
        return None

    async def overlays_at(self, record: DeployRecord) -> bool:
        """Did this deploy's push land although its gitops step was never recorded as done?"""
        tags = await self.deps.gitops.read_tags(self.config, record.envs)
        return bool(record.short) and all(
            set(tags.get(env, {}).values()) == {record.short} for env in record.envs
        )

    async def current_tag(self, env_name: str) -> str | None:
        """The api tag the env's overlay holds now."""
        return (await self.deps.gitops.read_tags(self.config, [env_name])).get(env_name, {}).get(Service.API)

    async def rollback_target(self, env_name: str) -> str:
        """Where a rollback goes: the last tag this bot deployed successfully, if the env has moved off it
        since (a failed deploy, or a hand edit of any service's overlay); else the tag before the newest
        deploy; else the newest earlier tag in the overlays' own git history. A tag is a way back only if
        some service does not run it now."""
        current = set((await self.deps.gitops.read_tags(self.config, [env_name])).get(env_name, {}).values())

        def moved_off(tag: str | None) -> bool:
            return bool(tag) and current != {tag}

        last = await self.deps.ledger.last_succeeded(env_name)
        if last is not None and moved_off(last.tags.get(env_name)):
            return last.tags[env_name]
        for record in await self.deps.ledger.history(env_name, 50):
            if not record.kind.changes_tags:
                continue
            previous = record.previous_tags.get(env_name)
            if previous and moved_off(previous):
                return previous
        # Nothing in the ledger (the env was only ever changed by hand): the overlays' own git history.
        env = self.config.env(env_name)
        for service in (Service.API, Service.RELAY):
            for tag in await self.deps.gitops.tag_history(env, service):
                if moved_off(tag):
                    return tag
        raise PermanentError(
            f"no earlier deploy of {env_name} is recorded, so there is nothing to roll back to",
            hint=f"Deploy a known-good commit instead: `/funnelcake deploy {env_name} <commit>`.",
        )
