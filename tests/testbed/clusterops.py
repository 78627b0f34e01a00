"""Helpers and fixtures shared by the cluster-operation tests (Argo CD, rollout, diagnosis, migrations,
builds, snapshots): the bot's config pointed at the test bed, and kube clients for the simulated cluster."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.adapters.kube import KubeClients
from bot.settings import Environment, FunnelcakeConfig
from tests.testbed.gitrepos import AppRemote, GitOpsRemote, funnelcake_config, push_from_second_clone
from tests.testbed.kube.cluster import SimCluster
from tests.testbed.kube.kubeconfig import write_kubeconfig


def sim_config(gitops: GitOpsRemote, app: AppRemote) -> FunnelcakeConfig:
    """config/funnelcake.yaml pointed at the test bed's registries and remotes (contexts unchanged)."""
    return funnelcake_config(gitops, app)


def bump_overlay(gitops: GitOpsRemote, env: str, service: str, tag: str) -> str:
    """A GitOps commit setting the service's newTag in `env` (what the bot's gitops step pushes); returns the sha."""

    def edit(text: str) -> str:
        pattern = re.compile(rf"(newName: [^\s]*/funnelcake-{service}\s*\n?\s*newTag: )(['\"]?)[^'\"\s\r]+\2")
        new, n = pattern.subn(lambda m: f"{m[1]}{m[2]}{tag}{m[2]}", text)
        if n != 1:
            raise AssertionError(f"could not bump {service} in the {env} overlay:\n{text}")
        return new

    return push_from_second_clone(
        gitops.url, gitops.overlay(service, env), edit, f"deploy({env}): funnelcake @ {tag}"
    )


@contextlib.asynccontextmanager
async def clients_for(cluster: SimCluster, tmp_path: Path) -> AsyncIterator[KubeClients]:
    """Kube clients for one simulated cluster (a lone SimCluster does not check tokens)."""
    path = write_kubeconfig(
        tmp_path / f"kubeconfig-{cluster.env_name}", {cluster.context: cluster.url}, token="t"
    )
    async with await KubeClients.from_kubeconfig(path, [cluster.context]) as clients:
        yield clients


# ------------------------------------------------------------------------------------- pytest fixtures


@pytest.fixture
async def staging_clients(sim_cluster: SimCluster, tmp_path: Path) -> AsyncIterator[KubeClients]:
    """Kube clients for the simulated staging cluster (`sim_cluster`)."""
    async with clients_for(sim_cluster, tmp_path) as clients:
        yield clients


@pytest.fixture
def cfg(sim_gitops: GitOpsRemote, app_remote: AppRemote) -> FunnelcakeConfig:
    """The bot's config pointed at the simulated GitOps remote, the app remote and the local registries."""
    return sim_config(sim_gitops, app_remote)


@pytest.fixture
def staging(cfg: FunnelcakeConfig) -> Environment:
    """The staging environment of `cfg` (the one `sim_cluster` simulates)."""
    return cfg.env("staging")
