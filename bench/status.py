"""Benchmark of the status report with every upstream 100 ms away: three envs vs the slowest one vs one-by-one.

Runs the whole local sandbox (real registries and git remotes, three simulated clusters, the live staging
site) and makes every upstream a round trip away: the fake kube API servers sleep `--latency` before each
request, the registries and the site sit behind latency-injecting reverse proxies, and the GitOps read
(a `git fetch` of GitHub in production, a local file remote here) is preceded by the same sleep. The app
repository's reads stay local: the bot keeps a mirror and only fetches it every 30 s.

Measured in one run, as medians:
  (a) build_report over the three envs, as the bot runs it;
  (b) build_report with a config holding only one env, for each env; the slowest is the baseline;
  (c) the same reads awaited one after another: every env, every service, every check in turn, through
      the same adapters. Its rows are compared with (a)'s, so both do the same work.
Then, for the reader: each read of (a) alone (where its critical path goes), and one env's cluster snapshot
healthy vs with crashing pods (their diagnoses, run concurrently, cost a few more round trips).

The relay and API checks (a real relay per env, tests/testbed/relay.py) are read directly, without a
latency proxy: they run alongside the site checks, and (c) runs each of them in turn as well.

The last line is `status ratio_vs_slowest=<a/b> speedup_vs_sequential=<c/a>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
from aiohttp import web
from pydantic import AnyHttpUrl
from yarl import URL

# Run as `.venv/bin/python bench/status.py` from anywhere: the test bed lives in the repository, not the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.adapters.argocd import ArgoCD
from bot.adapters.diagnosis import failing_reason, split_image
from bot.adapters.endpoints import check_api_health, check_relay_info, check_relay_req
from bot.adapters.gitops import GitOpsRepo
from bot.adapters.registry import ImageStatus
from bot.adapters.rollout import is_new_pod, pod_ready, template_images
from bot.adapters.site import check_site
from bot.adapters.snapshot import snapshot_all
from bot.drift import DriftReport, build_report
from bot.errors import BotError
from bot.models import AMD64
from bot.pipeline.context import Deps
from bot.settings import Environment, FunnelcakeConfig, Service
from bot.wiring import build_deps
from tests.testbed.sandbox import Sandbox

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the ones aiohttp recomputes.
_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)

Row = tuple[str | None, str | None, str, str | None, str, str, int, int]


class LatencyProxy:
    """A reverse proxy on 127.0.0.1 in front of one HTTP server, sleeping `latency` before forwarding each request.

    Bodies are passed through undecoded (compression included); a Location pointing at the upstream is
    rewritten to the proxy, so redirects and upload sessions stay behind the added latency.
    """

    def __init__(self, upstream: str, latency: float) -> None:
        self.upstream = URL(upstream).origin()
        self.latency = latency
        self.requests = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def host(self) -> str:
        """host:port, for an image prefix."""
        return URL(self.url).raw_authority

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=_UPSTREAM_TIMEOUT, auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> LatencyProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _forward(self, request: web.Request) -> web.Response:
        assert self._session is not None
        self.requests += 1
        await asyncio.sleep(self.latency)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            async with self._session.request(
                request.method,
                self.upstream.join(URL(request.path_qs, encoded=True)),
                headers=headers,
                data=body or None,
                allow_redirects=False,
            ) as resp:
                data = await resp.read()
                out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            return web.Response(
                status=502, text=f"proxy: upstream {self.upstream} failed: {type(e).__name__}"
            )
        if "Location" in out and out["Location"].startswith(str(self.upstream)):
            out["Location"] = self.url + out["Location"][len(str(self.upstream)) :]
        return web.Response(status=status, body=data, headers=out)


class DelayedGitOps:
    """The bot's GitOpsRepo with one round trip added before each read, standing in for the fetch from GitHub."""

    def __init__(self, inner: GitOpsRepo, latency: float) -> None:
        self._inner = inner
        self.latency = latency

    async def read_tags(self, config: FunnelcakeConfig) -> dict[str, dict[Service, str]]:
        await asyncio.sleep(self.latency)
        return await self._inner.read_tags(config)

    async def read_tags_each(self, envs: Iterable[Environment]) -> dict[str, dict[Service, str] | BotError]:
        """What build_report reads: every env's overlays, each standing alone."""
        await asyncio.sleep(self.latency)
        return await self._inner.read_tags_each(envs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# ------------------------------------------------------------------------------------------ sequential variant


@dataclasses.dataclass
class SequentialReport:
    rows: dict[tuple[str, str], Row]
    sites: dict[str, str | None]
    behind: dict[str, int]
    endpoints: dict[str, list[tuple[str, str, str | None]]] = dataclasses.field(default_factory=dict)


async def sequential_report(deps: Deps) -> SequentialReport:
    """build_report's reads with no concurrency at all: each request waits for the previous one's answer."""
    config = deps.config
    tags = await deps.gitops.read_tags(config)
    await deps.ledger.locks()
    out = SequentialReport({}, {}, {})
    for env in config.environments:
        client = deps.kube[env.kube_context]
        argo = ArgoCD(client, env.argocd.namespace, env_name=env.name)
        diagnoser = deps.diagnoser(env)
        overlay = tags.get(env.name, {})
        api_tag = overlay.get(Service.API)
        for service in Service:
            name, ns = service.image, env.namespace
            deploy = await client.call(
                f"deployment {ns}/{name}", client.apps.read_namespaced_deployment, name, ns
            )
            app = await argo.get(env.argocd.applications.get(service, f"funnelcake-{service.value}"))
            match = ((deploy.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            pods = await client.call(
                f"pods of {ns}/{name}",
                client.core.list_namespaced_pod,
                ns,
                label_selector=",".join(f"{k}={v}" for k, v in sorted(match.items())),
            )
            items = pods.get("items") or []
            for pod in items:
                pending = (pod.get("status") or {}).get("phase") == "Pending"
                if failing_reason(pod) is not None or pending:
                    await diagnoser.diagnose(client, pod)
            status: ImageStatus | str = "unknown: no overlay tag"
            if api_tag is not None:
                try:
                    status = await deps.registry.check(env.registry, service.image, api_tag, AMD64)
                except BotError as e:
                    status = f"unknown: {e.message}"
            images = template_images(deploy)
            main = (
                images.get(service.value)
                or images.get(service.image)
                or next((i for i in images.values() if f"/{service.image}:" in i), "")
            )
            argo_status = (app.get("status") or {}) if app else {}
            out.rows[(env.name, service.value)] = (
                overlay.get(service),
                split_image(main)[2] if main else None,
                status if isinstance(status, str) else status.state,
                None if isinstance(status, str) else status.digest,
                str((argo_status.get("sync") or {}).get("status") or "Unknown"),
                str((argo_status.get("health") or {}).get("status") or "Unknown"),
                sum(1 for p in items if is_new_pod(p, deploy) and pod_ready(p)),
                int((deploy.get("spec") or {}).get("replicas", 1)),
            )
        out.sites[env.name] = await _site(deps, env, overlay.get(Service.RELAY))
        out.endpoints[env.name] = await _endpoints_in_turn(deps, env, overlay.get(Service.RELAY))
    out.behind = await behind_production(deps, tags)
    return out


async def behind_production(deps: Deps, tags: dict[str, dict[Service, str]]) -> dict[str, int]:
    """How many commits each env lacks from production's: the app repo reads, alongside the registry checks."""
    behind: dict[str, int] = {}
    prod_tag = tags.get("production", {}).get(Service.API)
    if not prod_tag:
        return behind
    prod = await deps.app_repo.resolve(prod_tag)
    for env in deps.config.environments:
        tag = tags.get(env.name, {}).get(Service.API)
        if env.name == "production" or not tag:
            continue
        sha = (await deps.app_repo.resolve(tag)).sha
        if sha != prod.sha and await deps.app_repo.is_ancestor(sha, prod.sha):
            behind[env.name] = len(await deps.app_repo.commits_between(sha, prod.sha))
    return behind


async def _site(deps: Deps, env: Environment, tag: str | None) -> str | None:
    try:
        result = await check_site(
            str(env.site_url) if env.site_url else None,
            tag or "",
            session=deps.http,
            limit=deps.config.timeouts.site,
        )
    except BotError as e:
        return e.message
    return result.message if result.status != "skipped" else None


async def _endpoints_in_turn(
    deps: Deps, env: Environment, tag: str | None
) -> list[tuple[str, str, str | None]]:
    """The relay and API checks one after another: (check, status, NIP-11 version) of each."""
    limits = deps.config.timeouts
    ws = str(env.endpoints.relay_ws) if env.endpoints.relay_ws else None
    checks = [
        await check_relay_info(
            env.endpoints.relay_info_url, tag or "", session=deps.http, limit=limits.relay
        ),
        await check_relay_req(ws, session=deps.http, limit=limits.relay),
        await check_api_health(
            str(env.endpoints.api) if env.endpoints.api else None, session=deps.http, limit=limits.api
        ),
    ]
    return [(c.check, c.status, c.version) for c in checks]


def same_work(concurrent: DriftReport, sequential: SequentialReport) -> list[str]:
    """Where the two variants disagree; empty when they read the same things and saw the same state."""
    problems = []
    for env in concurrent.envs:
        if env.error:
            problems.append(f"{env.env}: {env.error}")
        for r in env.rows:
            row: Row = (
                r.overlay_tag,
                r.live_tag,
                r.registry,
                r.digest,
                r.argo_sync,
                r.argo_health,
                r.ready,
                r.total,
            )
            if sequential.rows.get((env.env, r.service)) != row:
                problems.append(
                    f"{env.env}/{r.service}: {row} vs {sequential.rows.get((env.env, r.service))}"
                )
        if env.site != sequential.sites.get(env.env):
            problems.append(f"{env.env} site: {env.site!r} vs {sequential.sites.get(env.env)!r}")
        checks = [(c.check, c.status, c.version) for c in env.checks]
        if checks != sequential.endpoints.get(env.env):
            problems.append(f"{env.env} endpoints: {checks} vs {sequential.endpoints.get(env.env)}")
        if len(env.behind) != sequential.behind.get(env.env, 0):
            problems.append(f"{env.env} behind: {len(env.behind)} vs {sequential.behind.get(env.env, 0)}")
    return problems


# ------------------------------------------------------------------------------------------ harness


async def phases(deps: Deps, runs: int) -> dict[str, float]:
    """Median time of each of build_report's reads on its own, with the same fan-out build_report uses."""
    config = deps.config
    envs = config.environments
    tags = await deps.gitops.read_tags(config)

    async def registries() -> None:
        await asyncio.gather(
            *(
                deps.registry.check(e.registry, s.image, tags[e.name][Service.API], AMD64)
                for e in envs
                for s in Service
            )
        )

    async def sites() -> None:
        await asyncio.gather(*(_site(deps, e, tags[e.name][Service.RELAY]) for e in envs))

    reads: dict[str, Callable[[], Awaitable[Any]]] = {
        "GitOps read": lambda: deps.gitops.read_tags(config),
        "cluster snapshots": lambda: snapshot_all(deps.kube, envs, diagnoser_for=deps.diagnoser),
        "registry checks": registries,
        "site checks": sites,
        "ledger locks": deps.ledger.locks,
        "behind production (app repo)": lambda: behind_production(deps, tags),
    }
    samples: dict[str, list[float]] = {name: [] for name in reads}
    for _ in range(runs):
        for name, fn in reads.items():
            samples[name].append((await timed(fn))[0])
    return {name: statistics.median(v) for name, v in samples.items()}


def only(config: FunnelcakeConfig, env: str) -> FunnelcakeConfig:
    return config.model_copy(update={"environments": [config.env(env)]})


def proxied(
    config: FunnelcakeConfig, proxies: dict[str, LatencyProxy], site: LatencyProxy
) -> FunnelcakeConfig:
    """The sandbox config with each env's registry and site reached through its latency proxy."""
    envs = []
    for env in config.environments:
        update: dict[str, Any] = {"registry": proxies[env.name].host + "/" + env.registry.split("/", 1)[1]}
        if env.site_url is not None:
            update["site_url"] = AnyHttpUrl(site.url + "/")
        envs.append(env.model_copy(update=update))
    return config.model_copy(update={"environments": envs})


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await fn()
    return time.perf_counter() - started, result


@contextlib.contextmanager
def cluster_latency(sb: Sandbox, latency: float) -> Iterator[None]:
    assert sb.clusters is not None
    apis = [c.api for c in sb.clusters.clusters.values()]
    for api in apis:
        api.latency = latency
    try:
        yield
    finally:
        for api in apis:
            api.latency = 0.0


def crash_pods(sb: Sandbox, env: str, deployment: str) -> int:
    """Put every pod of a Deployment in CrashLoopBackOff, as the kubelet reports a crashing container."""
    assert sb.clusters is not None
    store = sb.clusters[env].store

    def crash(pod: dict[str, Any]) -> None:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            cs["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting"}}
            cs["ready"] = False
            cs["restartCount"] = 5

    deploy = store.get("deployments", "funnelcake", deployment) or {}
    match = (deploy.get("spec") or {}).get("selector", {}).get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in sorted(match.items()))
    pods = store.list("pods", "funnelcake", label_selector=selector)[0] if selector else []
    for pod in pods:
        store.update("pods", "funnelcake", pod["metadata"]["name"], crash, subresource="status")
    return len(pods)


async def snapshot_ms(deps: Deps, env: str, runs: int) -> float:
    one = [deps.config.env(env)]
    return statistics.median(
        [
            (await timed(lambda: snapshot_all(deps.kube, one, diagnoser_for=deps.diagnoser)))[0]
            for _ in range(runs)
        ]
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


async def main(runs: int, sequential_runs: int, latency: float) -> None:
    async with contextlib.AsyncExitStack() as stack:
        t0 = time.perf_counter()
        sb = await stack.enter_async_context(Sandbox())
        assert sb.config is not None
        assert sb.site is not None
        proxies = {
            env: await stack.enter_async_context(LatencyProxy(sb.registries[env].url, latency))
            for env in sb.registries.by_env
        }
        site_proxy = await stack.enter_async_context(LatencyProxy(sb.site.url, latency))
        config = proxied(sb.config, proxies, site_proxy)
        print(f"sandbox up in {time.perf_counter() - t0:.1f}s; {ms(latency)} before every upstream answer")

        raw = await stack.enter_async_context(build_deps(sb.settings(), config))
        # a stand-in, not a subclass: it delegates everything to the clone build_deps made
        deps = dataclasses.replace(raw, gitops=cast("GitOpsRepo", DelayedGitOps(raw.gitops, latency)))
        stack.enter_context(cluster_latency(sb, latency))
        singles = {
            e.name: dataclasses.replace(deps, config=only(config, e.name)) for e in config.environments
        }

        # warm-up: clones, the credential plugin, connection pools; and proof that both variants do the same work
        report = await build_report(deps)
        seq = await sequential_report(deps)
        problems = same_work(report, seq)
        if problems:
            raise SystemExit(
                "the sequential variant disagrees with build_report:\n  " + "\n  ".join(problems)
            )
        for one_env in singles.values():
            await build_report(one_env)

        def counts() -> tuple[int, int]:
            assert sb.clusters is not None
            kube = sum(c.api.requests for c in sb.clusters.clusters.values())
            return kube, sum(p.requests for p in proxies.values()) + site_proxy.requests

        before = counts()
        await build_report(deps)
        after = counts()
        print(
            f"one three-env report: {after[0] - before[0]} kube requests, "
            f"{after[1] - before[1]} registry/site requests, 1 GitOps read"
        )

        full: list[float] = []
        single: dict[str, list[float]] = {name: [] for name in singles}
        # interleaved, so load from elsewhere on the machine falls on every variant alike
        for _ in range(runs):
            full.append((await timed(lambda: build_report(deps)))[0])
            for name, d in singles.items():
                single[name].append((await timed(functools.partial(build_report, d)))[0])
        sequential = [(await timed(lambda: sequential_report(deps)))[0] for _ in range(sequential_runs)]
        parts = await phases(deps, max(3, runs // 2))
        # a degraded env: the report diagnoses failing pods, and each diagnosis is a few more round trips
        healthy = await snapshot_ms(deps, "poc", 5)
        crashed = crash_pods(sb, "poc", "funnelcake-relay")
        degraded = await snapshot_ms(deps, "poc", 5)

    a = statistics.median(full)
    medians = {name: statistics.median(v) for name, v in single.items()}
    slowest = max(medians, key=lambda n: medians[n])
    b = medians[slowest]
    c = statistics.median(sequential)
    print(f"(a) three envs concurrently: median {ms(a)} (min {ms(min(full))}, max {ms(max(full))}, n={runs})")
    for name, v in single.items():
        print(f"(b) {name} alone: median {ms(medians[name])} (min {ms(min(v))}, max {ms(max(v))})")
    print(f"(c) sequential: median {ms(c)} (min {ms(min(sequential))}, n={sequential_runs})")
    print(f"slowest single env: {slowest}")
    # build_report's critical path: GitOps read, then the registry/site checks and the app repo reads (they
    # need its tags) side by side; the cluster snapshots and ledger run alongside from the start
    print("each read alone: " + ", ".join(f"{name} {ms(t)}" for name, t in parts.items()))
    after_tags = {n: parts[n] for n in ("registry checks", "site checks", "behind production (app repo)")}
    longest = max(after_tags, key=lambda n: after_tags[n])
    path = parts["GitOps read"] + after_tags[longest]
    print(
        f"critical path estimate: GitOps + {longest} = {ms(path)}; "
        f"cluster snapshots alongside {ms(parts['cluster snapshots'])}"
    )
    print(
        f"poc cluster snapshot: healthy {ms(healthy)}, with {crashed} relay pods in CrashLoopBackOff {ms(degraded)} "
        f"(+{ms(degraded - healthy)}: their diagnoses run concurrently)"
    )
    print(f"status ratio_vs_slowest={a / b:.2f} speedup_vs_sequential={c / a:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15, help="runs of (a) and of each (b)")
    parser.add_argument("--sequential-runs", type=int, default=3, help="runs of (c)")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds added to every upstream call")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.sequential_runs, args.latency))
