"""The whole local sandbox: real registries and git remotes, three simulated clusters, a live site, a real
Nostr relay and an API per env, and the environments file + kubeconfig that point the real bot at them.
Used by end-to-end tests and `make demo`.

Staging and poc have relay and API endpoints; production has none, as in the shipped environments file
(the runbook gives no URL for it), so its relay and API checks are the skipped ones. Each relay is the
`nostr-relay` package from PyPI (see tests/testbed/relay.py); it advertises, as its NIP-11 version, the tag
of the newest Ready pod of the env's funnelcake-relay Deployment — what a Service would route to — so a
rollout that lands flips it, and one whose pods never get Ready leaves it showing the old build.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from tests.testbed.kube.store import Store
from tests.testbed.registry import Registries
from tests.testbed.relay import NostrRelay

__all__ = ["ENDPOINT_ENVS", "LiveApi", "Sandbox", "sandbox"]

log = logging.getLogger("testbed.sandbox")

ENDPOINT_ENVS = ("staging", "poc")  # the envs whose relay and API the sandbox runs


def _image_tag(obj: dict[str, Any]) -> str | None:
    containers = obj.get("spec", {}).get("containers") or obj.get("spec", {}).get("template", {}).get(
        "spec", {}
    ).get("containers")
    image = str(containers[0].get("image", "")) if containers else ""
    return image_tag(image)


def image_tag(image: str) -> str | None:
    """The tag of `host/path/name:tag`, also when kustomize pinned it as `name:tag@sha256:…`."""
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[-1] if ":" in last else None


def serving_tag(store: Store, deployment: str) -> str | None:
    """The tag of the newest Ready, not terminating pod of `deployment`: what its Service routes to now."""
    pods, _ = store.list("pods", "funnelcake")
    ready = [
        p
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and any(
            str(ref.get("name", "")).rsplit("-", 1)[0] == deployment
            for ref in p["metadata"].get("ownerReferences") or []
        )
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (p.get("status") or {}).get("conditions") or []
        )
    ]
    if not ready:
        return None
    newest = max(ready, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))
    return _image_tag(newest)


class _LiveHttp:
    """One small aiohttp app on a free 127.0.0.1 port, answering from the env's simulated cluster."""

    def __init__(self, clusters: SimClusters, env: str) -> None:
        self.clusters = clusters
        self.env = env
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.down = False

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        app = web.Application()
        self.routes(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class LiveSite(_LiveHttp):
    """Plays relay.staging.dvines.org: the page shows the version the relay Deployment runs right now."""

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._index)

    async def _index(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503, text="upstream connect error")
        store = self.clusters[self.env].store
        dep = store.get("deployments", "funnelcake", "funnelcake-relay") or {}
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"] if dep else ""
        version = image_tag(image) or "unknown"
        return web.Response(
            text=f"<html><body><h1>funnelcake relay</h1><p>version: {version}</p></body></html>",
            content_type="text/html",
        )


class LiveApi(_LiveHttp):
    """Plays funnelcake-api's public side: `GET /health` answers 200 with the tag the api Deployment runs."""

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/health", self._health)

    async def _health(self, request: web.Request) -> web.Response:
        if self.down:
            return web.Response(status=503, text="no healthy upstream")
        dep = self.clusters[self.env].store.get("deployments", "funnelcake", "funnelcake-api") or {}
        return web.json_response({"status": "ok", "version": _image_tag(dep) or "unknown"})


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
        self.relays: dict[str, NostrRelay] = {}
        self.apis: dict[str, LiveApi] = {}
        self._followers: list[asyncio.Task[None]] = []
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
            self.relays = {env: NostrRelay(self.root, env, tags[env]) for env in ENDPOINT_ENVS}
            # a relay takes seconds to start (imports, its alembic upgrade): alongside everything else
            relays_up = asyncio.gather(*(r.start() for r in self.relays.values()))
            try:
                await push_deployed_images(self.registries, tags)
                self.clusters = SimClusters(
                    registries={env: (self.registries[env].url, prefixes[env]) for env in ENVS},
                    gitops_url=self.git.gitops.url,
                    app_url=app.url,
                    timings=self.timings,
                    work_dir=self.root / "clusters",
                )
                await self.clusters.start()
            finally:
                await relays_up
            self.clusters.write_kubeconfig(self.kubeconfig_path)
            self.site = LiveSite(self.clusters, "staging")
            await self.site.start()
            for env in ENDPOINT_ENVS:
                self.apis[env] = LiveApi(self.clusters, env)
                await self.apis[env].start()
                self._followers.append(
                    asyncio.create_task(self._follow_relay(env), name=f"sandbox-relay-{env}:follow")
                )
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
        data["timeouts"].update(
            {"rollout": 60, "sync": 60, "migrate": 60, "build": 60, "site": 5, "relay": 5, "api": 5}
        )
        for env in data["environments"]:
            env["registry"] = prefixes[env["name"]]
            if env["name"] == "staging":
                env["site_url"] = self.site.url
            if env["name"] in self.relays:
                env["endpoints"] = {
                    "relay_ws": self.relays[env["name"]].ws_url,
                    "api": self.apis[env["name"]].url,
                }
            else:
                env.pop("endpoints", None)
        return yaml.safe_dump(data, sort_keys=False)

    def reconfigure(self, **sections: Any) -> FunnelcakeConfig:
        """Rewrite the environments file with these top-level sections replaced (e.g. `watch={...}`), as an
        operator editing it would; bots started afterwards read the new file."""
        data: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        data.update(sections)
        text = yaml.safe_dump(data, sort_keys=False)
        self.config = parse_config(text, str(self.config_path))
        self.config_path.write_text(text)
        return self.config

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "funnelcake_config": self.config_path,
            "kubeconfig": self.kubeconfig_path,
            "database_url": f"sqlite+aiosqlite:///{self.root / 'ledger.db'}",
            "work_dir": self.root / "work",
        }
        values.update(overrides)
        return Settings(**values)

    async def _follow_relay(self, env: str) -> None:
        """Keep the env's relay advertising what its Ready pods run, as each pod change lands."""
        assert self.clusters is not None
        store = self.clusters[env].store
        queue = store.subscribe()
        try:
            while True:
                _kind, resource, _obj = await queue.get()
                if resource == "pods":
                    tag = serving_tag(store, "funnelcake-relay")
                    if tag is not None:
                        self.relays[env].advertise(tag)
        except Exception:
            log.exception("the %s relay stopped following its pods", env)
            raise
        finally:
            store.unsubscribe(queue)

    async def stop(self) -> None:
        for task in self._followers:
            task.cancel()
        for task in self._followers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._followers.clear()
        for part in (*self.apis.values(), *self.relays.values(), self.site, self.clusters, self.registries):
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
