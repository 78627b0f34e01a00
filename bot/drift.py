"""The status / drift report: per env and service, git vs live vs registry vs Argo CD vs pods, and findings (F11).

Every source is read concurrently, and each one failing only blanks its own column: an unreachable
cluster or registry is a finding, never a reason to hide the other envs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from bot.adapters.endpoints import EndpointCheck, check_endpoints, summary_line
from bot.adapters.registry import ImageStatus
from bot.adapters.site import SiteResult, check_site
from bot.adapters.snapshot import EnvSnapshot, ServiceSnapshot, snapshot_all
from bot.errors import BotError
from bot.ledger.models import ManualLock, who
from bot.models import AMD64, CommitInfo, plural
from bot.pipeline.context import Deps
from bot.pipeline.steps.gates import eligible
from bot.settings import Environment, Service

Severity = Literal["ok", "info", "warn", "error"]
T = TypeVar("T")


@dataclass(frozen=True)
class Finding:
    env: str
    severity: Severity
    text: str
    action: str | None = None  # a bot action a button can offer, e.g. "catchup:staging:e7e79eb"


@dataclass
class ServiceRow:
    service: str
    overlay_tag: str | None
    live_tag: str | None
    registry: str  # "ok" | "missing" | "wrong_platform" | "unknown: …"
    digest: str | None
    argo_sync: str
    argo_health: str
    ready: int
    total: int

    @property
    def healthy(self) -> bool:
        return (
            self.overlay_tag is not None
            and self.overlay_tag == self.live_tag
            and self.registry == "ok"
            and self.argo_sync == "Synced"
            and self.argo_health == "Healthy"
            and self.total > 0
            and self.ready == self.total
        )


@dataclass
class EnvReport:
    env: str
    rows: list[ServiceRow] = field(default_factory=list)
    error: str | None = None  # the cluster: "unreachable: …"
    overlay_error: str | None = None  # the env's overlays in the GitOps repo: "unreadable: …"
    registry_error: str | None = None  # the env's registry: "unreachable: …"
    site: str | None = None
    endpoints: str | None = None  # the relay row (NIP-11 version, REQ→EOSE latency) and the API's /health
    checks: list[EndpointCheck] = field(default_factory=list)
    lock: str | None = None
    behind: list[CommitInfo] = field(default_factory=list)
    eligible: list[str] | None = None  # for an env with a promotion gate: the commits it lets through

    def unavailable(self) -> list[tuple[str, str]]:
        """(part, why) for each part of the env that could not be read: overlays, registry, cluster."""
        parts = (("overlays", self.overlay_error), ("registry", self.registry_error), ("cluster", self.error))
        return [(part, why) for part, why in parts if why]


@dataclass
class DriftReport:
    envs: list[EnvReport]
    findings: list[Finding]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Behind:
    """What an env lacks from production: its api tag, production's short sha, the commits in between."""

    tag: str
    production: str
    commits: list[CommitInfo]


STATUS_DEADLINE = 20.0  # `status` answers within this, whatever hangs
GIT_LIMIT = 10.0  # the GitOps fetch and overlay reads; the registry and app-repo parts get what is left


async def _within(task: asyncio.Task[T], limit: float) -> T | None:
    """The task's result, or None when it is not done within `limit` seconds (it is then cancelled, and
    not waited for: a git thread that cannot be interrupted must not hold the report)."""
    done, _ = await asyncio.wait({task}, timeout=max(limit, 0.0))
    if not done:
        task.cancel()
        return None
    return task.result()


async def _registry(
    deps: Deps, env: Environment, tags: dict[Service, str], limit: float
) -> tuple[dict[Service, ImageStatus | str], str | None]:
    """Each service's image, checked against its OWN overlay tag; the second value says the env's registry
    did not answer in time (then every service is unknown)."""

    async def one(service: Service) -> ImageStatus | str:
        tag = tags.get(service)
        if tag is None:
            return "unknown: no overlay tag"
        try:
            return await deps.registry.check(env.registry, service.image, tag, AMD64)
        except BotError as e:
            return f"unknown: {e.message}"

    task = asyncio.create_task(_gather_services(one), name=f"status-registry-{env.name}")
    results = await _within(task, limit)
    if results is None:
        why = f"unreachable: {env.registry} did not answer within {limit:.0f} s"
        return {s: f"unknown: {why}" for s in Service}, why
    return results, None


async def _gather_services(
    one: Callable[[Service], Awaitable[ImageStatus | str]],
) -> dict[Service, ImageStatus | str]:
    results = await asyncio.gather(*(one(s) for s in Service))
    return dict(zip(Service, results, strict=True))


async def _site(deps: Deps, env: Environment, tag: str | None) -> SiteResult | str:
    try:
        return await check_site(
            str(env.site_url) if env.site_url else None,
            tag or "",
            session=deps.http,
            limit=deps.config.timeouts.site,
        )
    except BotError as e:
        return e.message


async def _endpoints(deps: Deps, env: Environment, tag: str | None) -> list[EndpointCheck]:
    """The relay and API checks; the relay's NIP-11 version is held against the relay overlay's tag."""
    return await check_endpoints(
        env.endpoints,
        tag or "",
        session=deps.http,
        relay_limit=deps.config.timeouts.relay,
        api_limit=deps.config.timeouts.api,
    )


async def _read_overlays(
    deps: Deps, envs: Sequence[Environment], limit: float
) -> dict[str, dict[Service, str] | str]:
    """env -> its overlay tags, or why they could not be read (that env's overlay, or the whole repo)."""
    task = asyncio.create_task(deps.gitops.read_tags_each(envs), name="status-gitops")
    try:
        each = await _within(task, limit)
    except BotError as e:
        return {env.name: f"unreadable: {e.message}" for env in envs}
    if each is None:
        why = f"unreadable: the GitOps repo did not answer within {limit:.0f} s"
        return {env.name: why for env in envs}
    return {name: (f"unreadable: {t.message}" if isinstance(t, BotError) else t) for name, t in each.items()}


async def build_report(deps: Deps, *, deadline: float = STATUS_DEADLINE) -> DriftReport:
    """Every env's row, within `deadline` seconds: a part that does not answer in time (a hung registry,
    GitOps remote or cluster) is reported as unreachable/unreadable for its env, and the rest is complete."""
    config = deps.config
    envs = config.environments
    loop = asyncio.get_running_loop()
    ends = loop.time() + deadline - 1.0  # a second to spare for assembling the report

    def left() -> float:
        return ends - loop.time()

    snaps_task = asyncio.create_task(
        snapshot_all(deps.kube, envs, diagnoser_for=deps.diagnoser, limit=min(20.0, deadline - 3.0)),
        name="status-clusters",
    )
    locks_task = asyncio.create_task(deps.ledger.locks(), name="status-locks")
    eligible_task = asyncio.create_task(_eligible(deps), name="status-eligible")
    tasks: list[asyncio.Task[Any]] = [snaps_task, locks_task, eligible_task]
    try:
        overlays = await _read_overlays(deps, envs, min(GIT_LIMIT, left()))
        tags = {name: t for name, t in overlays.items() if isinstance(t, dict)}
        # the app repo reads need only the tags: they run alongside the registry and site checks
        behind_task = asyncio.create_task(behind_production(deps, tags), name="status-behind-production")
        tasks.append(behind_task)
        registries, sites, endpoints = await asyncio.gather(
            asyncio.gather(*(_registry(deps, e, tags.get(e.name, {}), left()) for e in envs)),
            asyncio.gather(*(_site(deps, e, tags.get(e.name, {}).get(Service.RELAY)) for e in envs)),
            asyncio.gather(*(_endpoints(deps, e, tags.get(e.name, {}).get(Service.RELAY)) for e in envs)),
        )
        snaps: list[EnvSnapshot] | None = await _within(snaps_task, left())
        if snaps is None:
            snaps = [
                EnvSnapshot(e.name, error=f"unreachable: the cluster did not answer within {deadline:.0f} s")
                for e in envs
            ]
        try:
            locks: list[ManualLock] = await _within(locks_task, left()) or []
            lock_error = None
        except BotError as e:
            locks, lock_error = [], e.message
        behind: dict[str, Behind] = await _within(behind_task, left()) or {}
        gates: dict[str, list[str]] = await _within(eligible_task, left()) or {}
    finally:
        # on error or cancellation, nothing keeps reading after the report is gone
        for task in tasks:
            task.cancel()
    findings: list[Finding] = []
    if lock_error:
        findings.append(Finding("*", "warn", f"locks unknown: the ledger did not answer ({lock_error})"))
    reports = []
    for env, snap, (reg, reg_error), site, checks in zip(
        envs, snaps, registries, sites, endpoints, strict=True
    ):
        rep = EnvReport(env.name)
        read = overlays.get(env.name, {})
        overlay = read if isinstance(read, dict) else {}
        if isinstance(read, str):
            rep.overlay_error = read
            findings.append(Finding(env.name, "error", f"{env.name} overlays {read}"))
        if reg_error:
            rep.registry_error = reg_error
            findings.append(Finding(env.name, "error", f"{env.name} registry {reg_error}"))
        by_service: dict[str, ServiceSnapshot] = {s.service: s for s in snap.services}
        if not snap.reachable:
            rep.error = snap.error
            findings.append(Finding(env.name, "error", f"{env.name} cluster {snap.error}"))
        for service in Service:
            s = by_service.get(service.value)
            status = reg[service]
            rep.rows.append(
                ServiceRow(
                    service=service.value,
                    overlay_tag=overlay.get(service),
                    live_tag=s.tag if s else None,
                    registry=status if isinstance(status, str) else status.state,
                    digest=None if isinstance(status, str) else status.digest,
                    argo_sync=s.argo_sync if s else "Unknown",
                    argo_health=s.argo_health if s else "Unknown",
                    ready=s.ready if s else 0,
                    total=s.total if s else 0,
                )
            )
            _service_findings(
                env, service=service, overlay=overlay.get(service), snap=s, status=status, findings=findings
            )
        if isinstance(site, SiteResult):
            rep.site = site.message if site.status != "skipped" else None
            if site.status == "failed":
                findings.append(Finding(env.name, "error", site.message))
        else:
            rep.site = site
            findings.append(Finding(env.name, "warn", site))
        rep.checks = checks
        rep.endpoints = summary_line(checks)
        findings += [Finding(env.name, "error", c.message) for c in checks if c.status == "failed"]
        for lock in locks:
            if lock.env == env.name:
                rep.lock = f"locked by {who(lock.user)} since {lock.since:%Y-%m-%d %H:%M} UTC: {lock.reason}"
                findings.append(Finding(env.name, "warn", rep.lock, f"unlock:{env.name}"))
        rep.eligible = gates.get(env.name)
        reports.append(rep)
    for rep in reports:
        lag = behind.get(rep.env)
        if lag is None:
            continue
        rep.behind = lag.commits
        findings.append(
            Finding(
                rep.env,
                "warn",
                f"{rep.env} is {plural(len(lag.commits), 'commit')} behind production "
                f"({lag.tag} → {lag.production})",
                f"catchup:{rep.env}:{lag.production}",
            )
        )
    return DriftReport(reports, findings)


def _service_findings(
    env: Environment,
    *,
    service: Service,
    overlay: str | None,
    snap: ServiceSnapshot | None,
    status: ImageStatus | str,
    findings: list[Finding],
) -> None:
    name = service.image
    if snap is not None and overlay and snap.tag and snap.tag != overlay:
        findings.append(
            Finding(
                env.name, "warn", f"{name}: git says {overlay} but {env.name} runs {snap.tag} (not synced?)"
            )
        )
    if isinstance(status, ImageStatus) and not status.ok:
        what = "is missing from" if status.state == "missing" else f"is {', '.join(status.platforms)} only in"
        findings.append(
            Finding(
                env.name, "error", f"{name}:{overlay} {what} the {env.name} registry: pods cannot pull it"
            )
        )
    if snap is not None:
        for pod in snap.failing:
            text = f"{name}: pod {pod.name} is {pod.reason}"
            if pod.diagnosis is not None:
                text += f" — {pod.diagnosis.cause}. Fix: {pod.diagnosis.fix}"
            findings.append(Finding(env.name, "error", text, f"rollback:{env.name}"))
        for problem in snap.problems:
            findings.append(Finding(env.name, "warn", f"{name}: {problem}"))


async def _eligible(deps: Deps) -> dict[str, list[str]]:
    """env -> the commits its promotion gate lets through, e.g. `aaaf1b8 (staging d-abc123)`."""
    out: dict[str, list[str]] = {}
    for env in deps.config.environments:
        if env.promotion is None:
            continue
        try:
            found = await eligible(deps.ledger, env)
        except BotError:
            continue
        out[env.name] = [f"{e.short} ({env.promotion.after} {e.deploy_id})" for e in found]
    return out


async def behind_production(deps: Deps, tags: Mapping[str, Mapping[Service, str]]) -> dict[str, Behind]:
    """Each env whose api tag is an ancestor of production's, with the commits it lacks; unreadable refs are skipped."""
    prod_tag = tags.get("production", {}).get(Service.API)
    if not prod_tag:
        return {}
    try:
        prod = await deps.app_repo.resolve(prod_tag)
    except BotError:
        return {}
    behind: dict[str, Behind] = {}
    for env in deps.config.environments:
        tag = tags.get(env.name, {}).get(Service.API)
        if env.name == "production" or not tag:
            continue
        try:
            sha = (await deps.app_repo.resolve(tag)).sha
            if sha == prod.sha or not await deps.app_repo.is_ancestor(sha, prod.sha):
                continue
            commits = await deps.app_repo.commits_between(sha, prod.sha)
        except BotError:
            continue
        behind[env.name] = Behind(
            tag, prod.short, [CommitInfo(c.sha, c.short, c.subject, c.author) for c in commits]
        )
    return behind
