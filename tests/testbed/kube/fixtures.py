"""Fake Kubernetes API servers as pytest fixtures, and FakeClusters for use outside pytest (make demo)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from tests.testbed.kube.apiserver import FakeKubeAPI, TokenCheck
from tests.testbed.kube.kubeconfig import CONTEXTS, PLUGIN, plugin_env, write_kubeconfig
from tests.testbed.kube.store import Store

__all__ = ["FakeClusters", "kube_api", "kube_api_kubeconfig", "kube_clusters", "kube_store", "kubeconfig"]


class FakeClusters:
    """One isolated Store + API server per environment, behind the fake GKE exec plugin, and their kubeconfig.

    Nothing is shared between environments: each has its own store, server, port and objects.
    The servers check HMAC tokens minted by the plugin with `secret`; `token_lifetime` sets how long
    they stay valid. `plugin_invocations()` counts how often a client ran the plugin.
    """

    def __init__(
        self,
        directory: Path,
        envs: Iterable[str] = ("production", "staging", "poc"),
        *,
        secret: str | None = None,
        token_lifetime: float = 3600,
        history: int = 1000,
    ) -> None:
        self.directory = directory
        self.envs = tuple(envs)
        unknown = [e for e in self.envs if e not in CONTEXTS]
        if unknown:
            raise ValueError(f"unknown environments {unknown}; known: {sorted(CONTEXTS)}")
        self.secret = secret or secrets.token_hex(16)
        self.token_lifetime = token_lifetime
        self.tokens = TokenCheck(self.secret)
        self.stores: dict[str, Store] = {env: Store(history=history) for env in self.envs}
        self.apis: dict[str, FakeKubeAPI] = {
            env: FakeKubeAPI(self.stores[env], tokens=self.tokens) for env in self.envs
        }
        self.contexts: dict[str, str] = {env: CONTEXTS[env] for env in self.envs}
        self.kubeconfig = directory / "kubeconfig"
        self.counter = directory / "gke-auth-plugin-invocations"

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        started: list[FakeKubeAPI] = []
        try:
            for api in self.apis.values():
                await api.start()
                started.append(api)
        except BaseException:
            for api in started:
                await api.stop()
            raise
        write_kubeconfig(
            self.kubeconfig,
            {self.contexts[env]: self.apis[env].url for env in self.envs},
            exec_plugin=PLUGIN,
            exec_env=plugin_env(self.secret, lifetime=self.token_lifetime, counter=self.counter),
        )

    async def stop(self) -> None:
        for api in self.apis.values():
            await api.stop()

    async def __aenter__(self) -> FakeClusters:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def plugin_invocations(self) -> int:
        if not self.counter.exists():
            return 0
        return len(self.counter.read_text(encoding="utf-8").splitlines())


@pytest.fixture
def kube_store() -> Store:
    """An empty in-memory cluster."""
    return Store()


@pytest.fixture
async def kube_api(kube_store: Store) -> AsyncIterator[FakeKubeAPI]:
    """`kube_store` served over HTTP without authentication."""
    api = FakeKubeAPI(kube_store)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


@pytest.fixture
def kube_api_kubeconfig(kube_api: FakeKubeAPI, tmp_path: Path) -> Path:
    """A kubeconfig with one context, `fake`, for `kube_api` (no credentials needed)."""
    return write_kubeconfig(tmp_path / "kubeconfig-single", {"fake": kube_api.url})


@pytest.fixture
async def kube_clusters(tmp_path: Path) -> AsyncIterator[FakeClusters]:
    """Three isolated fake clusters (production, staging, poc) behind the fake GKE exec plugin."""
    clusters = FakeClusters(tmp_path / "kube")
    await clusters.start()
    try:
        yield clusters
    finally:
        await clusters.stop()


@pytest.fixture
def kubeconfig(kube_clusters: FakeClusters) -> Path:
    """The kubeconfig of `kube_clusters`: the three production context names, exec-plugin authentication."""
    return kube_clusters.kubeconfig
