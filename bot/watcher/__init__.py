"""The watcher: tell the team of trouble before anyone asks.

One bot at a time watches (the holder of the ledger lease `WATCH_LEASE`; a replica that loses it stops
posting at once, so two replicas never post the same incident twice). Every `watch.every` seconds it
looks at each env the way `status` does and turns what it sees into incidents:

- pods failing (ImagePullBackOff, ErrImagePull, CrashLoopBackOff, Pending) with the deploy's own
  diagnosis (cause, evidence, fix) and its one-click fix;
- Argo CD OutOfSync, Degraded (when no failing pod explains it) or a failed sync operation;
- the cluster unreachable;
- a GitOps commit that changed an env's overlay and was not made by the bot (who changed what): a notice,
  opened and closed at once;
- an env behind production (its api tag an ancestor of production's) for `behind_after` seconds, with a
  Catch up button; the app repo is read for it when the overlays change and at most every
  `BEHIND_EVERY` seconds otherwise, and each env's count goes to the commits-behind gauge.

An env with a deploy running (its lease is live) is left to that deploy, which diagnoses on its own. A
problem must be seen `confirm_after` looks in a row before it is posted and missed `clear_after` looks in
a row before it is closed ("recovered after 3 min"); one that comes back within `flap_window` reopens its
own message instead of posting a new one. Incidents live in the ledger, so a new leader carries on with
the open ones (updates the same messages) instead of posting them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from bot.adapters.endpoints import check_endpoints
from bot.adapters.snapshot import snapshot_env
from bot.drift import Behind, behind_production
from bot.errors import BotError
from bot.ledger import IncidentRecord, Ledger, LockHeld
from bot.settings import Environment
from bot.watcher.observations import (
    IncidentKind,
    Observation,
    behind,
    endpoint_failures,
    hand_edits,
    observe,
)

if TYPE_CHECKING:
    from bot.service import DeployService

# What a look sees (pure functions) lives in observations.py; every name is still found here.
__all__ = [
    "BEHIND_EVERY",
    "LOOK_LIMIT",
    "WATCH_HOLDER_DEPLOY",
    "WATCH_LEASE",
    "IncidentKind",
    "IncidentNotifier",
    "Observation",
    "Watcher",
    "behind",
    "endpoint_failures",
    "hand_edits",
    "observe",
]

log = logging.getLogger(__name__)

WATCH_LEASE = "~watcher"  # a lease row of its own: no env is called that (names are [a-z0-9-])
WATCH_HOLDER_DEPLOY = "watcher"
LOOK_LIMIT = 20.0  # one env's look never takes longer than this
BEHIND_EVERY = 60.0  # seconds between reads of how far each env trails production (unless overlays change)


class IncidentNotifier(Protocol):
    """Where incidents are told (the Slack front implements it). `opened` returns (channel, ts) or None
    when the env has nowhere to post."""

    async def opened(self, incident: IncidentRecord) -> tuple[str, str] | None: ...

    async def updated(self, incident: IncidentRecord) -> None: ...

    async def closed(self, incident: IncidentRecord, lasted: timedelta) -> None: ...


# ---- the watcher --------------------------------------------------------------------------------------


@dataclass
class _Seen:
    looks: int = 0  # consecutive looks that saw it
    missed: int = 0  # consecutive looks that did not


class Watcher:
    def __init__(self, service: DeployService, notifier: IncidentNotifier, *, lease_ttl: float) -> None:
        self.service = service
        self.notifier = notifier
        self.settings = service.config.watch
        # long enough for a whole look (each env within LOOK_LIMIT) with room to spare
        self.lease_ttl = max(lease_ttl, self.settings.every * 3, LOOK_LIMIT * 2)
        self.leading = False
        self._seen: dict[str, _Seen] = {}
        self._gitops_head: str | None = None
        # told the open incidents after every look (the metrics' incidents_open gauge)
        self.on_open: list[Callable[[Sequence[IncidentRecord]], None]] = []
        # told how many commits each env lacks from production, each time that is read (a gauge)
        self.on_behind: list[Callable[[Mapping[str, int]], None]] = []
        self._behind: dict[str, Behind] = {}
        self._behind_read: tuple[str | None, float] | None = None  # (GitOps head, monotonic time) of the read
        self._behind_since: dict[str, datetime] = {}

    @property
    def ledger(self) -> Ledger:
        return self.service.deps.ledger

    async def run(self) -> None:
        """Look every `watch.every` seconds while this bot holds the watcher lease; never returns."""
        while True:
            try:
                if await self._lead():
                    # a look ends well inside the lease, so no other replica can start leading mid-look
                    async with asyncio.timeout(self.lease_ttl * 0.8):
                        await self.look()
            except asyncio.CancelledError:
                raise
            except BotError as e:  # the ledger or git is away: weather, told once per look
                log.warning("watcher: this look was skipped: %s", e.message)
            except TimeoutError:
                log.warning("watcher: a look took longer than %.0f s and was cut short", self.lease_ttl * 0.8)
            except Exception:
                log.exception("watcher: a look failed; the next one tries again")
            await asyncio.sleep(self.settings.every)

    async def stop(self) -> None:
        """Give the watcher lease up (a graceful stop): another replica leads from its next look."""
        if self.leading:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self.ledger.release_lease(WATCH_LEASE, self.service.instance_id)
            self.leading = False

    async def _lead(self) -> bool:
        try:
            async with asyncio.timeout(10):
                await self.ledger.acquire_lease(
                    WATCH_LEASE,
                    holder=self.service.instance_id,
                    deploy_id=WATCH_HOLDER_DEPLOY,
                    ttl=self.lease_ttl,
                )
        except LockHeld:
            if self.leading:
                log.info("watcher: another bot watches now")
            self.leading = False
            return False
        except TimeoutError:
            self.leading = False
            return False
        if not self.leading:
            log.info("watcher: this bot watches the envs now")
            self._seen.clear()  # what the last leader saw is in the ledger; counting starts afresh
            self._gitops_head = None  # commits before now were the last leader's to tell
        self.leading = True
        return True

    async def look(self) -> None:
        """One look at every env, and the incidents brought up to date."""
        envs = self.service.config.environments
        observations = await self._hand_edits(envs)
        results = await asyncio.gather(*(self._look_at(env) for env in envs))
        watched: set[str] = set()
        for env, seen in zip(envs, results, strict=True):
            if seen is None:
                continue  # a deploy runs there: it is that deploy's to tell
            watched.add(env.name)
            observations += seen
        observations += [o for o in await self._behind_production(envs) if o.env in watched]
        await self._reconcile(observations, watched)

    async def _behind_production(self, envs: Sequence[Environment]) -> list[Observation]:
        head, now = self._gitops_head, time.monotonic()
        last = self._behind_read
        if last is None or last[0] != head or now - last[1] >= BEHIND_EVERY:
            deps = self.service.deps
            try:
                async with asyncio.timeout(LOOK_LIMIT):
                    read = await deps.gitops.read_tags_each(envs)
                    tags = {env: t for env, t in read.items() if not isinstance(t, BotError)}
                    self._behind = await behind_production(deps, tags)
            except (BotError, TimeoutError) as e:
                # what was read last stays true until a read succeeds: an outage closes no incident
                log.warning(
                    "watcher: could not read how far envs trail production: %s",
                    getattr(e, "message", "timed out"),
                )
            else:
                self._behind_read = (head, now)
                counts = {
                    e.name: len(self._behind[e.name].commits) if e.name in self._behind else 0 for e in envs
                }
                for callback in self.on_behind:
                    callback(counts)
        found: list[Observation] = []
        wall = datetime.now(UTC)
        for env in envs:
            lag = self._behind.get(env.name)
            if lag is None:
                self._behind_since.pop(env.name, None)
                continue
            since = self._behind_since.setdefault(env.name, wall)
            if (wall - since).total_seconds() >= self.settings.behind_after:
                found.append(behind(env.name, lag))
        return found

    async def _look_at(self, env: Environment) -> list[Observation] | None:
        lease = await self.ledger.get_lease(env.name)
        if lease is not None and lease.expires_at > datetime.now(UTC):
            return None
        deps = self.service.deps
        if env.kube_context not in deps.kube:
            return [
                Observation(
                    env.name,
                    IncidentKind.UNREACHABLE,
                    f"{env.name}:unreachable",
                    f"{env.name} has no kube context {env.kube_context} configured",
                )
            ]
        snap, checks = await asyncio.gather(
            snapshot_env(deps.kube[env.kube_context], env, diagnoser=deps.diagnoser(env), limit=LOOK_LIMIT),
            check_endpoints(
                env.endpoints,
                "",  # the version is the deploy's business; here: does the relay answer a REQ, the API /health
                session=deps.http,
                relay_limit=min(deps.config.timeouts.relay, LOOK_LIMIT),
                api_limit=min(deps.config.timeouts.api, LOOK_LIMIT),
            ),
        )
        return observe(env, snap) + endpoint_failures(env, checks)

    async def _hand_edits(self, envs: Sequence[Environment]) -> list[Observation]:
        gitops = self.service.deps.gitops
        try:
            async with asyncio.timeout(LOOK_LIMIT):
                head, commits = await gitops.overlay_commits(envs, self._gitops_head)
        except (BotError, TimeoutError) as e:
            log.warning("watcher: the GitOps repo could not be read: %s", getattr(e, "message", "timed out"))
            return []
        self._gitops_head = head
        return hand_edits(commits, gitops.author)

    async def _reconcile(self, observations: list[Observation], watched: set[str]) -> None:
        ledger = self.ledger
        now_seen = {o.key: o for o in observations}
        for key in now_seen:
            seen = self._seen.setdefault(key, _Seen())
            seen.looks, seen.missed = seen.looks + 1, 0
        open_incidents = {i.key: i for i in await ledger.incidents(open_only=True)}
        for key, obs in now_seen.items():
            incident = open_incidents.get(key)
            if incident is not None:
                if incident.title != obs.title or incident.detail != dict(obs.detail):
                    updated = await ledger.update_incident(
                        incident.id, title=obs.title, detail=dict(obs.detail)
                    )
                    await self._tell("updated", updated)
                continue
            if obs.notice or self._seen[key].looks >= self.settings.confirm_after:
                await self._open(obs)
        for key, incident in open_incidents.items():
            if key in now_seen or incident.env not in watched:
                continue  # still there, or not looked at (a deploy runs there)
            seen = self._seen.setdefault(key, _Seen(looks=0))
            seen.missed += 1
            if seen.missed >= self.settings.clear_after:
                closed = await ledger.update_incident(incident.id, closed=True)
                await self._tell_closed(closed)
                self._seen.pop(key, None)
        for key in [k for k, s in self._seen.items() if k not in now_seen and k not in open_incidents]:
            self._seen.pop(key, None)  # seen once, then gone: a blip, never posted
        if self.on_open:
            still_open = await ledger.incidents(open_only=True)
            for callback in self.on_open:
                callback(still_open)

    async def _open(self, obs: Observation) -> None:
        ledger = self.ledger
        recent = await self._recently_closed(obs.key)
        if recent is not None:
            reopened = await ledger.update_incident(
                recent.id,
                reopen=True,
                title=obs.title,
                detail={**obs.detail, "reopened": int(recent.detail.get("reopened", 0)) + 1},
            )
            log.warning(
                "incident back", extra={"env": obs.env, "kind": obs.kind.value, "incident": obs.title}
            )
            await self._tell("updated", reopened)
            return
        incident, new = await ledger.open_incident(
            obs.env, obs.kind.value, obs.key, obs.title, dict(obs.detail)
        )
        if not new:
            return
        try:
            where = await self.notifier.opened(incident)
        except Exception:
            log.exception("watcher: could not post incident %s", obs.key)
            where = None
        if where is not None:
            incident = await ledger.update_incident(incident.id, channel=where[0], message_ts=where[1])
        log.warning("incident opened", extra={"env": obs.env, "kind": obs.kind.value, "incident": obs.title})
        if obs.notice:
            await ledger.update_incident(incident.id, closed=True)

    async def _recently_closed(self, key: str) -> IncidentRecord | None:
        if self.settings.flap_window <= 0:
            return None
        since = datetime.now(UTC) - timedelta(seconds=self.settings.flap_window)
        for incident in await self.ledger.incidents(open_only=False, limit=50):
            if incident.key == key and incident.closed_at is not None and incident.closed_at >= since:
                return incident
        return None

    async def _tell(self, what: str, incident: IncidentRecord) -> None:
        try:
            await self.notifier.updated(incident)
        except Exception:
            log.exception("watcher: could not %s the post of incident %s", what, incident.key)

    async def _tell_closed(self, incident: IncidentRecord) -> None:
        lasted = (incident.closed_at or datetime.now(UTC)) - incident.opened_at
        log.info(
            "incident closed", extra={"env": incident.env, "kind": incident.kind, "incident": incident.title}
        )
        try:
            await self.notifier.closed(incident, lasted)
        except Exception:
            log.exception("watcher: could not close the post of incident %s", incident.key)
