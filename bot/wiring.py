"""The composition root for the deploy service: the one place where adapters are built and closed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import aiohttp

from bot.adapters.apprepo import AppRepo
from bot.adapters.build import Builder
from bot.adapters.gitops import GitOpsRepo
from bot.adapters.gitutil import GitCredentials
from bot.adapters.kube import KubeClients
from bot.adapters.migrations import MigrationRunner
from bot.adapters.registry import RegistryClient
from bot.ledger import Ledger
from bot.pipeline.context import Deps
from bot.service import DeployService, ReporterFactory
from bot.settings import FunnelcakeConfig, Settings


async def _kube(settings: Settings, config: FunnelcakeConfig) -> KubeClients:
    contexts = [e.kube_context for e in config.environments]
    if settings.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        # The bot's own pod can only reach the cluster it runs in; the others need a kubeconfig.
        return KubeClients.in_cluster(contexts[0])
    return await KubeClients.from_kubeconfig(settings.kubeconfig, contexts)


@contextlib.asynccontextmanager
async def build_deps(settings: Settings, config: FunnelcakeConfig) -> AsyncIterator[Deps]:
    work = settings.work_dir
    creds = GitCredentials.from_settings(settings)
    timeouts = config.timeouts
    async with contextlib.AsyncExitStack() as stack:
        # The ledger first: a DATABASE_URL that cannot work is told before anything else is set up.
        ledger = await Ledger.open(settings.database_url)
        stack.push_async_callback(ledger.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        registry = await stack.enter_async_context(
            RegistryClient(
                timeout=timeouts.registry.request,
                stream_idle_timeout=timeouts.registry.stream_idle,
                attempts=timeouts.registry.attempts,
                retry_budget=timeouts.registry.retries,
            )
        )
        kube = await _kube(settings, config)
        stack.push_async_callback(kube.close)
        yield Deps(
            config=config,
            app_repo=AppRepo(
                config.repos.app.url,
                work / "app.git",
                branch=config.repos.app.branch,
                credentials=creds,
                fetch_timeout=timeouts.git,
            ),
            gitops=GitOpsRepo(
                config.repos.gitops.url,
                work / "gitops",
                branch=config.repos.gitops.branch,
                credentials=creds,
                author=(settings.gitops_author_name, settings.gitops_author_email),
                signing_key=settings.gitops_signing_key,
                pin_digests=config.repos.gitops.pin_digests,
                network_timeout=timeouts.git,
                render_timeout=timeouts.render,
            ),
            registry=registry,
            kube=kube,
            migrations=MigrationRunner(job_timeout=timeouts.migrate),
            http=http,
            ledger=ledger,
            builder=Builder(kube, repo_url=config.repos.app.url, limit=timeouts.build),
        )


@contextlib.asynccontextmanager
async def build_service(
    settings: Settings, config: FunnelcakeConfig, *, reporters: ReporterFactory | None = None
) -> AsyncIterator[DeployService]:
    async with build_deps(settings, config) as deps:
        service = DeployService(
            deps, reporters=reporters, lease_ttl=settings.lease_ttl, heartbeat_every=settings.lease_ttl / 4
        )
        try:
            yield service
        finally:
            await service.shutdown()
