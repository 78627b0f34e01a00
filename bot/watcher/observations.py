"""What a watcher look sees: pure functions from snapshots, endpoint checks, overlay commits and lag to
observations (one problem in one env, keyed so a look and the next agree it is the same incident).

Split out of bot.watcher (the Watcher loop), which re-exports these names. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bot.adapters.endpoints import EndpointCheck
from bot.adapters.overlays import OverlayCommit
from bot.adapters.snapshot import EnvSnapshot, ServiceSnapshot
from bot.drift import Behind
from bot.models import plural
from bot.settings import Environment


class IncidentKind(StrEnum):
    PODS_FAILING = "pods_failing"
    OUT_OF_SYNC = "out_of_sync"
    DEGRADED = "degraded"
    SYNC_FAILED = "sync_failed"
    UNREACHABLE = "unreachable"
    ENDPOINT_FAILING = "endpoint_failing"
    HAND_EDIT = "hand_edit"
    BEHIND_PRODUCTION = "behind_production"


@dataclass(frozen=True)
class Observation:
    """One problem seen in one look. `key` makes it the same incident from one look to the next."""

    env: str
    kind: IncidentKind
    key: str
    title: str
    detail: Mapping[str, Any] = field(default_factory=dict)  # cause, evidence, fix, actions, author…
    notice: bool = False  # a one-off (a hand edit): posted, then closed at once


# ---- what a look sees ---------------------------------------------------------------------------------


def observe(env: Environment, snap: EnvSnapshot) -> list[Observation]:
    """The problems one env's snapshot shows."""
    if not snap.reachable:
        return [
            Observation(
                env.name,
                IncidentKind.UNREACHABLE,
                f"{env.name}:unreachable",
                f"{env.name}'s cluster is {snap.error}",
                {
                    "cause": f"the bot cannot read {env.name}'s cluster",
                    "evidence": snap.error or "",
                    "fix": (f"Check the cluster and the bot's access to kube context {env.kube_context}."),
                },
            )
        ]
    found: list[Observation] = []
    for svc in snap.services:
        found += _service(env, svc)
    return found


def _service(env: Environment, svc: ServiceSnapshot) -> list[Observation]:
    found: list[Observation] = []
    name = f"funnelcake-{svc.service}"
    if svc.failing:
        first = svc.failing[0]
        d = first.diagnosis
        pods = ", ".join(f"{p.name} ({p.reason})" for p in svc.failing)
        detail: dict[str, Any] = {
            "service": svc.service,
            "tag": svc.tag,
            "pods": pods,
            "cause": d.cause if d else f"pod {first.name} is {first.reason}",
            "evidence": d.evidence if d else first.reason,
            "fix": d.fix if d else f"Roll {env.name} back, or look at `kubectl describe pod {first.name}`.",
            "actions": ["rollback", "rebuild"] if svc.tag else ["rollback"],
        }
        found.append(
            Observation(
                env.name,
                IncidentKind.PODS_FAILING,
                f"{env.name}:pods:{svc.service}",
                f"{name} pods failing in {env.name}: {first.reason}",
                detail,
            )
        )
    elif svc.argo_health == "Degraded":
        found.append(
            Observation(
                env.name,
                IncidentKind.DEGRADED,
                f"{env.name}:degraded:{svc.service}",
                f"{name} is Degraded in {env.name}'s Argo CD",
                {
                    "service": svc.service,
                    "cause": f"Argo CD reports {name} Degraded",
                    "evidence": f"health {svc.argo_health}, pods {svc.ready}/{svc.total} ready",
                    "fix": f"Look at the Argo CD application, or roll {env.name} back.",
                    "actions": ["rollback"],
                },
            )
        )
    if svc.argo_sync == "OutOfSync":
        found.append(
            Observation(
                env.name,
                IncidentKind.OUT_OF_SYNC,
                f"{env.name}:out_of_sync:{svc.service}",
                f"{name} is OutOfSync in {env.name}: git and the cluster differ",
                {
                    "service": svc.service,
                    "cause": "the GitOps repo and the cluster differ and nothing synced them",
                    "evidence": f"Argo CD sync status {svc.argo_sync} (revision {svc.argo_revision[:7] or '?'})",
                    "fix": f"Deploy through the bot, or sync {name} in {env.name}'s Argo CD.",
                    "actions": [],
                },
            )
        )
    op = svc.last_operation
    if op is not None and op.phase in ("Failed", "Error"):
        found.append(
            Observation(
                env.name,
                IncidentKind.SYNC_FAILED,
                f"{env.name}:sync_failed:{svc.service}:{op.started_at}",
                f"{name}'s last Argo CD sync in {env.name} {op.phase.lower()}",
                {
                    "service": svc.service,
                    "cause": f"the sync started by {op.initiated_by or 'someone'} at {op.started_at} {op.phase.lower()}",
                    "evidence": op.message,
                    "fix": f"Read the sync result in Argo CD, fix the manifests, or roll {env.name} back.",
                    "actions": ["rollback"],
                },
            )
        )
    return found


def endpoint_failures(env: Environment, checks: Sequence[EndpointCheck]) -> list[Observation]:
    """The relay or the API not answering as a relay and an API must (their pods may all be Ready)."""
    return [
        Observation(
            env.name,
            IncidentKind.ENDPOINT_FAILING,
            f"{env.name}:endpoint:{c.check}",
            f"{c.check} fails in {env.name}",
            {
                "cause": f"{c.check} at {c.url or '?'} does not answer as it must",
                "evidence": c.message,
                "fix": f"Look at the {'API' if c.check.startswith('api') else 'relay'}'s logs and storage in "
                f"{env.name}, or roll back if a deploy brought it.",
                "actions": ["rollback"],
            },
        )
        for c in checks
        if c.status == "failed"
    ]


def hand_edits(commits: Sequence[OverlayCommit], bot_author: tuple[str, str]) -> list[Observation]:
    """Overlay commits not made by the bot: one notice per commit and env."""
    found: list[Observation] = []
    for c in commits:
        if (c.author, c.email) == bot_author:
            continue
        for env in c.envs:
            found.append(
                Observation(
                    env,
                    IncidentKind.HAND_EDIT,
                    f"{env}:hand_edit:{c.sha}",
                    f"{c.author} changed {env}'s overlay by hand in {c.short}: {c.subject}",
                    {
                        "commit": c.sha,
                        "author": c.author,
                        "email": c.email,
                        "subject": c.subject,
                        "cause": f"a commit by {c.author} <{c.email}>, not by the bot, changed {env}'s overlay",
                        "evidence": f"{c.short} {c.subject}",
                        "fix": "If this was not meant, roll back; the bot's `status` shows what runs now.",
                        "actions": ["rollback"],
                    },
                    notice=True,
                )
            )
    return found


def behind(env: str, lag: Behind) -> Observation:
    """An env lacking commits production runs: the one-click fix deploys production's tag there."""
    listed = "\n".join(f"{c.short} {c.subject}" for c in lag.commits[:10])
    if len(lag.commits) > 10:
        listed += f"\n… and {len(lag.commits) - 10} more"
    return Observation(
        env,
        IncidentKind.BEHIND_PRODUCTION,
        f"{env}:behind_production",
        f"{env} is {plural(len(lag.commits), 'commit')} behind production ({lag.tag} → {lag.production})",
        {
            "tag": lag.tag,
            "target": lag.production,
            "cause": f"production runs {lag.production}, which {env} ({lag.tag}) does not have",
            "evidence": listed,
            "fix": f"Catch {env} up: `deploy {env} {lag.production}` (the button does it).",
            "actions": ["catchup"],
        },
    )
