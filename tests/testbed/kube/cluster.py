"""A simulated GKE cluster for the test bed: Store + fake API server + the controllers that play Argo CD,
the Deployment and Job controllers and the kubelet, seeded like a running funnelcake environment.

`SimCluster` is one environment; `SimClusters` the three isolated ones behind the production context
names and the fake GKE exec plugin. Both are plain async components (start/stop, async context
managers) so `make demo` can use them outside pytest; the fixtures at the bottom compose them with the
real local registries and the seeded git remotes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets as pysecrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.gitrepos import DEFAULT_DEPLOYED, ENVS, AppRemote, GitOpsRemote, seed_gitops_repo
from tests.testbed.kube.apiserver import FakeKubeAPI, TokenCheck
from tests.testbed.kube.argocd import REFRESH, ArgoCD, CommandError
from tests.testbed.kube.controller import (
    DeploymentController,
    KeyedWorker,
    StoreView,
    Supervisor,
    Timings,
    rand_suffix,
)
from tests.testbed.kube.jobs import MIGRATE_IMAGE, ClickHouseState, JobController
from tests.testbed.kube.kubeconfig import CONTEXTS, PLUGIN, plugin_env, write_kubeconfig
from tests.testbed.kube.kubelet import EventRecorder, Kubelet, parse_image
from tests.testbed.kube.scheduler import node_object, schedule_pending
from tests.testbed.kube.store import Store
from tests.testbed.registry import Registries

__all__ = [
    "MIGRATION_MODES",
    "ClusterController",
    "SimCluster",
    "SimClusters",
    "Timings",
    "push_deployed_images",
    "sim_cluster",
    "sim_clusters",
    "sim_gitops",
    "sim_timings",
]

# the scheduler's two passes: pods never tried, and every Pending pod again after a cluster change
_NEW, _RETRY = ("", "new pods"), ("", "retry")

log = logging.getLogger("testbed.kube.cluster")

# as in config/funnelcake.yaml: production is ClickHouse Cloud, the others run ClickHouse in-cluster
MIGRATION_MODES = {"production": "cloud", "staging": "self-hosted", "poc": "self-hosted"}
SERVICES = ("api", "relay")
NAMESPACE = "funnelcake"
ARGOCD_NAMESPACE = "argocd"
CLICKHOUSE_SECRET = "funnelcake-clickhouse-credentials"
BUILDER_SERVICE_ACCOUNT = "funnelcake-builder"
# Fleet project numbers, made up (Connect Gateway URLs name the project by number, not id).
PROJECT_NUMBERS = {"production": "104729310482", "staging": "208318541107", "poc": "377215905263"}


def gateway_path(env_name: str) -> str:
    """The Connect Gateway path of an env's membership, which every Kubernetes API path sits under."""
    number = PROJECT_NUMBERS.get(env_name, "999999999999")
    return f"/v1/projects/{number}/locations/us-central1/gkeMemberships/gke-{env_name}-membership"


class ClusterController:
    """The whole simulated control plane + nodes of one cluster, driven by the Store's change feed."""

    def __init__(
        self,
        store: Store,
        *,
        env_name: str,
        registry_url: str,
        registry_prefix: str,
        gitops_url: str,
        app_url: str,
        migrations_mode: str,
        work_dir: Path,
        timings: Timings | None = None,
        clickhouse: ClickHouseState | None = None,
    ) -> None:
        self.env_name = env_name
        self.timings = timings or Timings.fast()
        self.store = StoreView(store)
        self.sup = Supervisor(f"simkube-{env_name}")
        self.nodes = [f"gke-{env_name}-default-pool-{i:08x}-{rand_suffix(4)}" for i in (0x3A1C, 0x9F20)]
        self.events = EventRecorder(self.store)
        self.deployments = DeploymentController(self.store, self.sup, self.timings, self.nodes, self.events)
        self.clickhouse = clickhouse or ClickHouseState()
        self.kubelet = Kubelet(
            self.store,
            self.sup,
            self.timings,
            self.events,
            registry_url=registry_url,
            registry_prefix=registry_prefix,
        )
        self.jobs = JobController(
            self.store,
            self.sup,
            self.timings,
            self.nodes,
            kubelet=self.kubelet,
            events=self.events,
            clickhouse=self.clickhouse,
            migrations_mode=migrations_mode,
            app_url=app_url,
            work_dir=work_dir,
        )
        self.argocd = ArgoCD(self.store, self.sup, self.timings, gitops_url=gitops_url, work_dir=work_dir)
        # kube-scheduler's retry of Pending pods; one key, so a burst of cluster events is one pass
        self.scheduler = KeyedWorker(self.sup, "scheduler", self._schedule)
        self._queue: asyncio.Queue[tuple[str, str, dict[str, Any]]] | None = None
        self._main: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # both clone their repository mirror; independent, so concurrently
        await asyncio.gather(self.argocd.start(), self.jobs.start())
        self._queue = self.store.raw.subscribe()
        self._main = asyncio.create_task(self._dispatch(), name=f"simkube-{self.env_name}:dispatch")
        # objects that existed before we subscribed
        for resource in ("deployments", "pods", "jobs", "applications"):
            for obj in await self.store.list(resource):
                self._route("ADDED", resource, obj)

    async def stop(self) -> None:
        if self._main is not None:
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
            self._main = None
        if self._queue is not None:
            with contextlib.suppress(Exception):
                self.store.raw.unsubscribe(self._queue)
            self._queue = None
        await self.sup.close()
        await self.kubelet.close()

    @property
    def errors(self) -> list[BaseException]:
        """Unexpected failures inside the controller (tests assert this stays empty)."""
        return self.sup.errors

    async def _dispatch(self) -> None:
        assert self._queue is not None
        while True:
            event_type, resource, obj = await self._queue.get()
            try:
                self._route(event_type, resource, obj)
            except Exception:
                log.exception("routing %s %s failed", event_type, resource)

    async def _schedule(self, key: tuple[str, str]) -> None:
        await schedule_pending(self.store, self.events, self.nodes, retry=key == _RETRY)

    def _route(self, event_type: str, resource: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (str(meta.get("namespace", "default")), str(meta.get("name", "")))
        if resource == "deployments":
            if event_type == "DELETED":
                self.kubelet.collect_orphans(obj, self.sup)
            self.deployments.worker.schedule(key)
            self.argocd.deployment_changed(key)
        elif resource == "nodes":
            self.scheduler.schedule(_RETRY)  # a node added or relabelled may take a Pending pod
        elif resource == "pods":
            if event_type == "DELETED":
                self.kubelet.forget(obj)
                if (obj.get("spec") or {}).get("nodeName"):
                    self.scheduler.schedule(_RETRY)  # its node has room again
            else:
                if not (obj.get("spec") or {}).get("nodeName") and not (obj.get("status") or {}).get(
                    "conditions"
                ):
                    self.scheduler.schedule(_NEW)  # a pod created without a controller here
                elif (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    self.scheduler.schedule(_RETRY)  # its requests no longer count on its node
                self.kubelet.observe(obj)
            owner = self.deployments.owner_of(obj)
            if owner is not None:
                self.deployments.worker.schedule(owner)
            self.jobs.pod_changed(obj)
        elif resource == "jobs" and event_type != "DELETED":
            # a deleted Job's pods are the Store's business: it honours propagationPolicy (Orphan by default)
            self.jobs.worker.schedule(key)
        elif resource == "applications" and event_type != "DELETED":
            self.argocd.worker.schedule(key)


def _secret_values(env_name: str, mode: str) -> dict[str, str]:
    """Recognisably fake ClickHouse credentials (tests grep for them to prove nothing leaks)."""
    values = {
        "CLICKHOUSE_USER": f"testbed_{env_name}_user",
        "CLICKHOUSE_PASSWORD": f"testbed-fake-password-{env_name}-8d1f",
        "CLICKHOUSE_DATABASE": "funnelcake",
    }
    if mode == "cloud":
        values["CLICKHOUSE_URL"] = (
            f"clickhouse://testbed-fake-{env_name}.us-central1.gcp.clickhouse.cloud:9440"
        )
    else:
        # self-hosted envs keep a URL in the secret too; only a Job that wrongly uses it times out (F8)
        values["CLICKHOUSE_URL"] = f"clickhouse://testbed-fake-{env_name}.clickhouse.cloud:9440"
    return values


class SimCluster:
    """One simulated environment's cluster: its own Store, API server, controllers and ClickHouse."""

    def __init__(
        self,
        env_name: str,
        *,
        registry_url: str,
        registry_prefix: str,
        gitops_url: str,
        app_url: str,
        migrations_mode: str,
        timings: Timings | None = None,
        tokens: TokenCheck | None = None,
        work_dir: Path | None = None,
        clickhouse_version: int | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.env_name = env_name
        self.registry_url = registry_url
        self.registry_prefix = registry_prefix
        self.gitops_url = gitops_url
        self.app_url = app_url
        self.migrations_mode = migrations_mode
        self.timings = timings or Timings.fast()
        self.context = CONTEXTS.get(env_name, env_name)
        self.store = Store(termination_seconds=self.timings.termination, gc_delay=self.timings.gc_delay)
        # https with the test bed's CA, under the Connect Gateway path of this env's fleet membership
        self.api = FakeKubeAPI(self.store, tokens=tokens, tls=True, prefix=gateway_path(env_name))
        self.clickhouse = ClickHouseState(version=clickhouse_version)
        self._derive_version = clickhouse_version is None
        self._own_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix=f"simkube-{env_name}-"))
        self.start_timeout = start_timeout
        self.controller: ClusterController | None = None

    # knobs on the nodes, for tests and the demo
    @property
    def kubelet(self) -> Kubelet:
        assert self.controller is not None, "SimCluster.start() has not run"
        return self.controller.kubelet

    @property
    def deny_registry_pulls(self) -> bool:
        return self.kubelet.deny_registry_pulls

    @deny_registry_pulls.setter
    def deny_registry_pulls(self, value: bool) -> None:
        self.kubelet.deny_registry_pulls = value

    @property
    def crash_tags(self) -> set[str]:
        return self.kubelet.crash_tags

    @property
    def exec_format_tags(self) -> set[str]:
        return self.kubelet.exec_format_tags

    @property
    def url(self) -> str:
        return self.api.url

    @property
    def errors(self) -> list[BaseException]:
        return self.controller.errors if self.controller is not None else []

    async def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        await self.api.start()
        try:
            self.controller = ClusterController(
                self.store,
                env_name=self.env_name,
                registry_url=self.registry_url,
                registry_prefix=self.registry_prefix,
                gitops_url=self.gitops_url,
                app_url=self.app_url,
                migrations_mode=self.migrations_mode,
                work_dir=self.work_dir,
                timings=self.timings,
                clickhouse=self.clickhouse,
            )
            await self.controller.start()
            await asyncio.wait_for(self._seed(), self.start_timeout)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self.controller is not None:
            await self.controller.stop()
            self.controller = None
        await self.api.stop()
        if self._own_dir:
            await asyncio.to_thread(shutil.rmtree, self.work_dir, True)

    async def __aenter__(self) -> SimCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------------------------- seeding

    async def _seed(self) -> None:
        """A running environment: credentials, the two Applications synced at the GitOps head, Ready pods."""
        values = _secret_values(self.env_name, self.migrations_mode)
        self._seed_cluster_objects()
        self.store.create(
            "secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": CLICKHOUSE_SECRET, "namespace": NAMESPACE},
                "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
            },
        )
        for service in SERVICES:
            self.store.create("applications", self.application(service, operation=True))
        await self.wait_for_app_state(
            {f"funnelcake-{s}" for s in SERVICES}, sync="Synced", health="Healthy", within=self.start_timeout
        )
        if self._derive_version:
            self.clickhouse.version = await self._deployed_schema_version()
        self.clickhouse.note(f"seeded at version {self.clickhouse.version}")

    def _seed_cluster_objects(self) -> None:
        """What every GKE cluster has before anyone deploys: namespaces, nodes, service accounts."""
        assert self.controller is not None
        for ns in ("default", "kube-system", "kube-public", ARGOCD_NAMESPACE, NAMESPACE):
            self.store.create(
                "namespaces",
                {
                    "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                },
            )
        for node in self.controller.nodes:
            self.store.create("nodes", node_object(node))
        for ns in ("default", ARGOCD_NAMESPACE, NAMESPACE):
            self.store.create("serviceaccounts", {"metadata": {"name": "default", "namespace": ns}})
        # the identity the build Jobs run as (Workload Identity bound to the registry writer)
        self.store.create(
            "serviceaccounts",
            {
                "metadata": {
                    "name": BUILDER_SERVICE_ACCOUNT,
                    "namespace": NAMESPACE,
                    "annotations": {
                        "iam.gke.io/gcp-service-account": f"funnelcake-builder@{self.env_name}.iam.gserviceaccount.com"
                    },
                }
            },
        )

    def application(self, service: str, *, operation: bool = False) -> dict[str, Any]:
        """The Argo CD Application for one service, as the platform team declared it."""
        app: dict[str, Any] = {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {
                "name": f"funnelcake-{service}",
                "namespace": ARGOCD_NAMESPACE,
                "labels": {"app.kubernetes.io/part-of": "funnelcake"},
            },
            "spec": {
                "project": "default",
                "source": {
                    "repoURL": self.gitops_url,
                    "path": f"k8s/applications/funnelcake-{service}/overlays/{self.env_name}",
                    "targetRevision": "main",
                },
                "destination": {"server": "https://kubernetes.default.svc", "namespace": NAMESPACE},
                # no automated sync: a push to main does not deploy (F2)
                "syncPolicy": {"syncOptions": ["CreateNamespace=false"]},
            },
        }
        if operation:
            app["operation"] = {
                "initiatedBy": {"username": "platform-team"},
                "sync": {"syncStrategy": {"hook": {}}},
            }
        return app

    async def _deployed_schema_version(self) -> int | None:
        """The schema version matching the migrations baked into the deployed api's commit."""
        assert self.controller is not None
        dep = self.store.get("deployments", NAMESPACE, "funnelcake-api")
        if dep is None:
            return None
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
        ref = parse_image(image)
        if ref is None:
            return None
        try:
            migrations = await self.controller.jobs.program.migrations_at(ref.tag)
        except CommandError:
            return None
        return max((m.version for m in migrations), default=None)

    # ----------------------------------------------------------------------------- test helpers

    async def wait_for_app_state(
        self, names: set[str], *, sync: str, health: str, within: float = 10.0
    ) -> None:
        """Until every named Application reports this sync and health status, without pending work."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            states = {}
            for name in names:
                app = self.store.get("applications", ARGOCD_NAMESPACE, name) or {}
                status = app.get("status") or {}
                states[name] = (
                    (status.get("sync") or {}).get("status"),
                    (status.get("health") or {}).get("status"),
                    (status.get("operationState") or {}).get("phase"),
                    "operation" in app or REFRESH in ((app.get("metadata") or {}).get("annotations") or {}),
                )
            if all(
                s[0] == sync and s[1] == health and s[2] != "Running" and not s[3] for s in states.values()
            ):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{self.env_name}: applications never reached {sync}/{health}: {states}")
            await asyncio.sleep(0.01)

    def image_ref(self, image: str, tag: str) -> str:
        return f"{self.registry_prefix}/{image}:{tag}"


class SimClusters:
    """The three isolated simulated clusters, behind the production context names and the GKE exec plugin."""

    def __init__(
        self,
        *,
        registries: Mapping[str, tuple[str, str]],
        gitops_url: str,
        app_url: str,
        timings: Timings | None = None,
        work_dir: Path | None = None,
        envs: Sequence[str] = ENVS,
        secret: str | None = None,
        token_lifetime: float = 3600,
    ) -> None:
        """`registries` maps env -> (registry URL, image prefix)."""
        self.secret = secret or pysecrets.token_hex(16)
        self.token_lifetime = token_lifetime
        self.tokens = TokenCheck(self.secret)
        self._own_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="simkube-"))
        self.clusters: dict[str, SimCluster] = {
            env: SimCluster(
                env,
                registry_url=registries[env][0],
                registry_prefix=registries[env][1],
                gitops_url=gitops_url,
                app_url=app_url,
                migrations_mode=MIGRATION_MODES.get(env, "self-hosted"),
                timings=timings,
                tokens=self.tokens,
                work_dir=self.work_dir / env,
            )
            for env in envs
        }

    def __getitem__(self, env: str) -> SimCluster:
        return self.clusters[env]

    @property
    def contexts(self) -> dict[str, str]:
        return {env: c.context for env, c in self.clusters.items()}

    async def start(self) -> None:
        results = await asyncio.gather(*(c.start() for c in self.clusters.values()), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await self.stop()
            raise failed[0]

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.clusters.values()), return_exceptions=True)
        if self._own_dir:
            await asyncio.to_thread(shutil.rmtree, self.work_dir, True)

    async def __aenter__(self) -> SimClusters:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def write_kubeconfig(self, path: Path, *, counter: Path | None = None) -> Path:
        """One kubeconfig, a context per env, authenticating through the fake gke-gcloud-auth-plugin."""
        return write_kubeconfig(
            path,
            {c.context: c.url for c in self.clusters.values()},
            exec_plugin=PLUGIN,
            exec_env=plugin_env(self.secret, lifetime=self.token_lifetime, counter=counter),
        )


async def push_deployed_images(registries: Registries, tags: Mapping[str, str]) -> None:
    """Put the images each env runs into that env's registry (what was deployed before the bot existed)."""
    jobs = [
        registries.push(env, image, tag, "amd64", seed=f"{image}:{tag}")
        for env, tag in tags.items()
        for image in ("funnelcake-api", "funnelcake-relay", MIGRATE_IMAGE)
    ]
    await asyncio.gather(*jobs)


# ------------------------------------------------------------------------------------- pytest fixtures


@pytest.fixture
def sim_timings() -> Timings:
    """Fast timings; override this fixture in a test module to slow the cluster down."""
    return Timings.fast()


@pytest.fixture
async def sim_gitops(registries: Registries, app_remote: AppRemote, tmp_path: Path) -> GitOpsRemote:
    """A GitOps remote whose overlays point at the real local registries (images not pushed yet)."""
    tags = {env: app_remote.short(label) for env, label in DEFAULT_DEPLOYED.items()}
    prefixes = {env: registries.prefix(env) for env in ENVS}
    return await asyncio.to_thread(seed_gitops_repo, tmp_path / "sim-gitops", prefixes, tags)


@pytest.fixture
async def sim_clusters(
    registries: Registries,
    app_remote: AppRemote,
    sim_gitops: GitOpsRemote,
    sim_timings: Timings,
    tmp_path: Path,
) -> AsyncIterator[SimClusters]:
    """Three running simulated clusters (production, staging, poc) seeded from the GitOps head."""
    await push_deployed_images(registries, sim_gitops.tags)
    clusters = SimClusters(
        registries={env: (registries[env].url, registries.prefix(env)) for env in ENVS},
        gitops_url=sim_gitops.url,
        app_url=app_remote.url,
        timings=sim_timings,
        work_dir=tmp_path / "simkube",
    )
    await clusters.start()
    try:
        yield clusters
    finally:
        await clusters.stop()


@pytest.fixture
async def sim_cluster(
    registries: Registries,
    app_remote: AppRemote,
    sim_gitops: GitOpsRemote,
    sim_timings: Timings,
    tmp_path: Path,
) -> AsyncIterator[SimCluster]:
    """One running simulated cluster: staging (self-hosted ClickHouse), seeded from the GitOps head.

    Only staging's registry holds the deployed images; the other two registries start empty.
    """
    await push_deployed_images(registries, {"staging": sim_gitops.tags["staging"]})
    cluster = SimCluster(
        "staging",
        registry_url=registries["staging"].url,
        registry_prefix=registries.prefix("staging"),
        gitops_url=sim_gitops.url,
        app_url=app_remote.url,
        migrations_mode=MIGRATION_MODES["staging"],
        timings=sim_timings,
        work_dir=tmp_path / "simkube-staging",
    )
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()
