"""The whole local sandbox: real registries and git remotes, three simulated clusters, a live site, and the
environments file + kubeconfig that point the real bot at them. Used by end-to-end tests and `make demo`."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from bot.service import DeployService
from bot.settings import DEFAULT_CONFIG_PATH, FunnelcakeConfig, Settings, parse_config
from bot.wiring import build_service
from tests.testbed.gitrepos import ENVS, GitRemotes
from tests.testbed.kube.cluster import SimClusters, Timings, push_deployed_images
from tests.testbed.registry import Registries

__all__ = ["Sandbox", "sandbox"]


class LiveSite:
    """Plays relay.staging.dvines.org: the page shows the version the relay Deployment runs right now."""

    def __init__(self, clusters: SimClusters, env: str) -> None:
        self.clusters = clusters
        self.env = env
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.down = False

    async def _index(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503, text="upstream connect error")
        store = self.clusters[self.env].store
        dep = store.get("deployments", "funnelcake", "funnelcake-relay") or {}
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"] if dep else ""
        version = image.rsplit(":", 1)[-1] if ":" in image else "unknown"
        return web.Response(
            text=f"<html><body><h1>funnelcake relay</h1><p>version: {version}</p></body></html>",
            content_type="text/html",
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._index)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Sandbox:
    """Everything the bot talks to, on this machine. `async with Sandbox() as sb:` then `sb.settings()`."""

    def __init__(self, *, timings: Timings | None = None, root: Path | None = None) -> None:
        # Fast, but with a 12 s progress deadline (600 s x 0.02): end-to-end runs on a loaded machine
        # must not see a healthy rollout declared failed; fail-fast diagnosis never waits for it anyway.
        self.timings = timings or replace(Timings.fast(), deadline_scale=0.02)
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="funnelcake-sandbox-"))
        self.registries = Registries()
        self.git: GitRemotes | None = None
        self.clusters: SimClusters | None = None
        self.site: LiveSite | None = None
        self.config_path = self.root / "funnelcake.yaml"
        self.kubeconfig_path = self.root / "kubeconfig"
        self.config: FunnelcakeConfig | None = None

    async def start(self) -> None:
        try:
            await self.registries.start()
            prefixes = {env: self.registries.prefix(env) for env in ENVS}
            self.git = await asyncio.to_thread(GitRemotes(self.root / "git", prefixes).setup)
            app = self.git.app
            tags = {env: app.short(label) for env, label in self.git.deployed.items()}
            await push_deployed_images(self.registries, tags)
            self.clusters = SimClusters(
                registries={env: (self.registries[env].url, prefixes[env]) for env in ENVS},
                gitops_url=self.git.gitops.url,
                app_url=app.url,
                timings=self.timings,
                work_dir=self.root / "clusters",
            )
            await self.clusters.start()
            self.clusters.write_kubeconfig(self.kubeconfig_path)
            self.site = LiveSite(self.clusters, "staging")
            await self.site.start()
            self.config = parse_config(self._config_yaml(prefixes), str(self.config_path))
            self.config_path.write_text(self._config_yaml(prefixes))
        except BaseException:
            await self.stop()
            raise

    def _config_yaml(self, prefixes: dict[str, str]) -> str:
        """config/funnelcake.yaml with the registries, repos and site pointed at the sandbox."""
        assert self.git is not None
        assert self.site is not None
        data: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
        data["repos"]["app"]["url"] = self.git.app.url
        data["repos"]["gitops"]["url"] = self.git.gitops.url
        data["timeouts"].update({"rollout": 60, "sync": 60, "migrate": 60, "build": 60, "site": 5})
        for env in data["environments"]:
            env["registry"] = prefixes[env["name"]]
            if env["name"] == "staging":
                env["site_url"] = self.site.url
        return yaml.safe_dump(data, sort_keys=False)

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "funnelcake_config": self.config_path,
            "kubeconfig": self.kubeconfig_path,
            "database_url": f"sqlite+aiosqlite:///{self.root / 'ledger.db'}",
            "work_dir": self.root / "work",
        }
        values.update(overrides)
        return Settings(**values)

    async def stop(self) -> None:
        for part in (self.site, self.clusters, self.registries):
            if part is not None:
                with contextlib.suppress(Exception):
                    await part.stop()
        if self._own_root:
            await asyncio.to_thread(shutil.rmtree, self.root, True)

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    sb = Sandbox(root=tmp_path / "sandbox")
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
async def svc(sandbox: Sandbox) -> AsyncIterator[DeployService]:
    """The real deploy service (bot.wiring.build_service) on the sandbox, reporting nowhere."""
    assert sandbox.config is not None
    async with build_service(sandbox.settings(), sandbox.config) as service:
        yield service
