"""What the deploy steps share: the adapters (built once, in bot.app) and the explicit outputs of each step."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from bot.adapters.argocd import ArgoCD
from bot.adapters.diagnosis import Diagnoser
from bot.models import CommitInfo, DeployKind, Plan
from bot.settings import Environment, FunnelcakeConfig

if TYPE_CHECKING:
    import aiohttp

    from bot.adapters.apprepo import AppRepo
    from bot.adapters.argocd import SyncResult
    from bot.adapters.build import Builder
    from bot.adapters.endpoints import EndpointCheck
    from bot.adapters.gitops import GitOpsRepo
    from bot.adapters.kube import KubeClients
    from bot.adapters.migrations import MigrationRun, MigrationRunner
    from bot.adapters.overlays import BumpResult
    from bot.adapters.registry import ImageStatus, RegistryClient
    from bot.adapters.rollout import RolloutResult
    from bot.adapters.site import SiteResult
    from bot.ledger import Ledger


Guard = Callable[[str], Awaitable[None]]


async def _nothing_to_prove() -> None:
    return None


class People(Protocol):
    """Who a chat user ID is, for records people outside the chat read (git trailers)."""

    async def identity(self, user: str) -> str | None:
        """`Name <email>` for a user ID, or None when the directory does not say."""
        ...


@dataclass
class Deps:
    """The adapters a deploy needs; each talks to one external system."""

    config: FunnelcakeConfig
    app_repo: AppRepo
    gitops: GitOpsRepo
    registry: RegistryClient
    kube: KubeClients
    migrations: MigrationRunner
    http: aiohttp.ClientSession
    ledger: Ledger
    builder: Builder | None = None
    people: People | None = None  # set by a front that knows the chat's directory (Slack)

    def argocd(self, env: Environment) -> ArgoCD:
        return ArgoCD(
            self.kube[env.kube_context],
            env.argocd.namespace,
            env_name=env.name,
            refresh_limit=self.config.timeouts.argocd.refresh,
            sync_limit=self.config.timeouts.sync,
            post_sync_limit=self.config.timeouts.argocd.settle,
        )

    def diagnoser(self, env: Environment) -> Diagnoser:
        return Diagnoser(env, self.config.environments, check=self.registry.check)


@dataclass
class DeployContext:
    """One run of the pipeline. Steps read what earlier steps wrote here, never globals."""

    deps: Deps
    deploy_id: str
    kind: DeployKind
    envs: list[Environment]
    ref: str
    requester: str
    force_migrations: bool = False
    rebuild: bool = False  # build every image from source even where a registry has the tag
    allow_downgrade: bool = False  # the requester confirmed moving an env back (a downgrade)
    override_reason: str | None = None  # an admin goes past a promotion gate, saying why
    approver: str | None = None  # who approved it, when the env needs approval
    # Called right before each world-changing action (a push, a Job, a sync request) with what it is
    # about to do: it proves the run still owns its deploy and leases, or raises Fenced. Plans have none.
    guard: Guard = field(default=lambda action: _nothing_to_prove())
    # outputs, in pipeline order
    commit: CommitInfo | None = None
    plan: Plan | None = None
    verified: dict[tuple[str, str], ImageStatus] = field(default_factory=dict)
    migration_runs: dict[str, MigrationRun] = field(default_factory=dict)
    bump: BumpResult | None = None
    synced: dict[str, list[SyncResult]] = field(default_factory=dict)
    rollouts: dict[str, list[RolloutResult]] = field(default_factory=dict)
    sites: dict[str, SiteResult] = field(default_factory=dict)
    endpoints: dict[str, list[EndpointCheck]] = field(default_factory=dict)  # env -> relay and API checks

    @property
    def env_names(self) -> list[str]:
        return [e.name for e in self.envs]

    def require_plan(self) -> Plan:
        if self.plan is None:  # a wiring bug: preflight always runs first
            raise RuntimeError("the plan is not built yet")
        return self.plan
