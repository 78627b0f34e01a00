"""Read-only snapshot of the three simulated clusters: images, pods, Argo CD, failing pods; one env down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.adapters.diagnosis import Cause, Diagnoser
from bot.adapters.kube import KubeClients
from bot.adapters.registry import RegistryClient
from bot.adapters.snapshot import snapshot_all
from bot.settings import FunnelcakeConfig
from tests.test_argocd import sim_config
from tests.test_rollout import set_image
from tests.testbed.gitrepos import DEFAULT_DEPLOYED, AppRemote, GitOpsRemote
from tests.testbed.kube.cluster import SimClusters


@pytest.fixture
def cfg(sim_gitops: GitOpsRemote, app_remote: AppRemote) -> FunnelcakeConfig:
    return sim_config(sim_gitops, app_remote)


@pytest.fixture
async def clients(sim_clusters: SimClusters, tmp_path: Path) -> AsyncIterator[KubeClients]:
    path = sim_clusters.write_kubeconfig(tmp_path / "kubeconfig")
    async with await KubeClients.from_kubeconfig(
        path, sim_clusters.contexts.values(), request_timeout=3
    ) as c:
        yield c


async def test_snapshot_of_every_env(
    sim_clusters: SimClusters, clients: KubeClients, cfg: FunnelcakeConfig, app_remote: AppRemote
) -> None:
    snaps = await snapshot_all(clients, cfg.environments)
    assert [s.env for s in snaps] == ["production", "staging", "poc"]
    for snap in snaps:
        assert snap.reachable, snap.error
        want = app_remote.short(DEFAULT_DEPLOYED[snap.env])
        by_service = {s.service: s for s in snap.services}
        assert set(by_service) == {"api", "relay"}
        for svc in by_service.values():
            assert svc.tag == want
            assert (svc.ready, svc.total) == (2, 2)
            assert (svc.argo_sync, svc.argo_health) == ("Synced", "Healthy")
            assert len(svc.argo_revision) == 40
            assert svc.last_operation is not None
            assert svc.last_operation.phase == "Succeeded"
            assert svc.failing == ()
            assert svc.problems == ()
        assert by_service["relay"].images["relay"].endswith(f"/funnelcake-relay:{want}")


async def test_one_env_down_the_others_still_report(
    sim_clusters: SimClusters, clients: KubeClients, cfg: FunnelcakeConfig
) -> None:
    await sim_clusters["poc"].api.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    snaps = {s.env: s for s in await snapshot_all(clients, cfg.environments, limit=5)}
    assert loop.time() - started < 5
    assert snaps["poc"].error is not None
    assert snaps["poc"].error.startswith("unreachable: ")
    assert "gke-poc" in snaps["poc"].error, snaps["poc"].error
    assert snaps["production"].reachable
    assert snaps["staging"].reachable
    assert len(snaps["staging"].services) == 2


async def test_failing_pods_carry_their_diagnosis(
    sim_clusters: SimClusters, clients: KubeClients, cfg: FunnelcakeConfig
) -> None:
    staging = cfg.env("staging")
    set_image(sim_clusters["staging"], "api", staging.image_ref("funnelcake-api", "0badbad"))

    async with RegistryClient(attempts=1) as rc:

        def diagnoser_for(env):  # type: ignore[no-untyped-def]
            return Diagnoser(env, cfg.environments, check=rc.check, event_grace=0.2)

        async with asyncio.timeout(10):
            while True:
                snaps = {
                    s.env: s
                    for s in await snapshot_all(clients, cfg.environments, diagnoser_for=diagnoser_for)
                }
                api = next(s for s in snaps["staging"].services if s.service == "api")
                if api.failing and api.failing[0].diagnosis is not None:
                    break
                await asyncio.sleep(0.1)
    assert api.tag == "0badbad"
    pod = api.failing[0]
    assert pod.reason in {"ErrImagePull", "ImagePullBackOff"}
    assert pod.diagnosis.kind is Cause.TAG_MISSING
    assert all(not s.failing for s in snaps["poc"].services)
