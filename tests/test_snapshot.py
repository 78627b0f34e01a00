"""Read-only snapshot of the three simulated clusters: images, pods, Argo CD, failing pods; one env down; diagnosis fan-out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from bot.adapters.diagnosis import Cause, Diagnoser, Diagnosis
from bot.adapters.kube import KubeClients
from bot.adapters.registry import RegistryClient
from bot.adapters.snapshot import _MAX_DIAGNOSED, _failing_pods, snapshot_all
from bot.errors import TransientError
from bot.settings import DEFAULT_CONFIG_PATH, Environment, FunnelcakeConfig, load_config
from tests.test_rollout import set_image
from tests.testbed.gitrepos import DEFAULT_DEPLOYED, AppRemote
from tests.testbed.kube.cluster import SimClusters


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


# ---------------------------------------------------------------------------------- which pods, how concurrently


def _pod(name: str, *, waiting: str | None = None, pending: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Pending" if pending else "Running"}
    if waiting is not None:
        status["containerStatuses"] = [{"name": "relay", "state": {"waiting": {"reason": waiting}}}]
    return {"metadata": {"name": name, "namespace": "funnelcake"}, "status": status}


class SlowDiagnoser:
    """Answers after `delay`, counting diagnoses in flight; a name in `none` gets no diagnosis, in `broken` a BotError."""

    def __init__(
        self, delay: float = 0.2, none: frozenset[str] = frozenset(), broken: frozenset[str] = frozenset()
    ):
        self.delay, self.none, self.broken = delay, none, broken
        self.in_flight = self.most_in_flight = 0
        self.asked: list[str] = []
        self.finished = 0

    async def diagnose(self, client: object, pod: dict[str, Any]) -> Diagnosis | None:
        name = pod["metadata"]["name"]
        self.asked.append(name)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        self.finished += 1
        if name in self.broken:
            raise TransientError(f"events of pod {name}: connection refused")
        if name in self.none:
            return None
        return Diagnosis(cause=f"{name} broke", evidence="", fix="", pod=name)


def _env() -> Environment:
    return load_config(DEFAULT_CONFIG_PATH).env("poc")


async def test_failing_pods_are_diagnosed_together_up_to_the_cap() -> None:
    pods = [
        _pod("p0", pending=True),
        _pod("c1", waiting="CrashLoopBackOff"),
        _pod("c2", waiting="ImagePullBackOff"),
        _pod("ok", waiting=None),
        _pod("c3", waiting="CrashLoopBackOff"),
        _pod("c4", waiting="CrashLoopBackOff"),
        _pod("c5", waiting="CreateContainerConfigError"),
    ]
    diagnoser = SlowDiagnoser(delay=0.3, broken=frozenset({"c2"}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    failing = await _failing_pods(cast(Any, None), _env(), pods, cast(Any, diagnoser))
    elapsed = loop.time() - started
    # the cap's worth of failing pods, at once: one diagnosis' time, not three
    assert sorted(diagnoser.asked) == ["c1", "c2", "c3"]
    assert diagnoser.most_in_flight == _MAX_DIAGNOSED == 3
    assert elapsed < 0.3 * 2, elapsed
    # every failing pod is listed, in the listing's order; the Pending one had no slot left
    assert [(f.name, f.reason) for f in failing] == [
        ("c1", "CrashLoopBackOff"),
        ("c2", "ImagePullBackOff"),
        ("c3", "CrashLoopBackOff"),
        ("c4", "CrashLoopBackOff"),
        ("c5", "CreateContainerConfigError"),
    ]
    diagnosed = {f.name: f.diagnosis.cause if f.diagnosis else None for f in failing}
    # a diagnosis that could not be read blanks only its own pod
    assert diagnosed == {"c1": "c1 broke", "c2": None, "c3": "c3 broke", "c4": None, "c5": None}


async def test_pending_pods_fill_the_slots_a_pod_being_created_leaves() -> None:
    pods = [
        _pod("p0", pending=True),
        _pod("p1", pending=True),
        _pod("c1", waiting="ErrImagePull"),
        _pod("p2", pending=True),
        _pod("p3", pending=True),
    ]
    # p0 is only being created: its slot goes to p2 in a second round; p3 finds every slot taken
    diagnoser = SlowDiagnoser(delay=0.05, none=frozenset({"p0"}))
    failing = await _failing_pods(cast(Any, None), _env(), pods, cast(Any, diagnoser))
    assert diagnoser.asked == ["c1", "p0", "p1", "p2"]
    assert diagnoser.most_in_flight == 2
    assert [(f.name, f.reason) for f in failing] == [
        ("p1", "Pending"),
        ("c1", "ErrImagePull"),
        ("p2", "Pending"),
    ]
    assert all(f.diagnosis is not None for f in failing)
    assert await _failing_pods(cast(Any, None), _env(), [_pod("ok")], cast(Any, diagnoser)) == ()


async def test_a_snapshot_cut_short_leaves_no_diagnosis_running() -> None:
    pods = [_pod(f"c{i}", waiting="CrashLoopBackOff") for i in range(3)]
    diagnoser = SlowDiagnoser(delay=5)
    task = asyncio.create_task(_failing_pods(cast(Any, None), _env(), pods, cast(Any, diagnoser)))
    while diagnoser.most_in_flight < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert diagnoser.in_flight == 0
    assert diagnoser.finished == 0


async def test_every_crash_looping_replica_is_diagnosed_on_the_cluster(
    sim_clusters: SimClusters, clients: KubeClients, cfg: FunnelcakeConfig
) -> None:
    store = sim_clusters["poc"].store
    match = store.get("deployments", "funnelcake", "funnelcake-relay")["spec"]["selector"]["matchLabels"]
    selector = ",".join(f"{k}={v}" for k, v in sorted(match.items()))
    pods = store.list("pods", "funnelcake", label_selector=selector)[0]
    assert len(pods) == 2

    def crash(pod: dict[str, Any]) -> None:
        for cs in pod["status"]["containerStatuses"]:
            cs["state"] = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting"}}
            cs["ready"] = False
            cs["restartCount"] = 4

    for pod in pods:
        store.update("pods", "funnelcake", pod["metadata"]["name"], crash, subresource="status")
    poc = cfg.env("poc")
    (snap,) = await snapshot_all(clients, [poc])
    relay = next(s for s in snap.services if s.service == "relay")
    assert sorted(f.name for f in relay.failing) == sorted(p["metadata"]["name"] for p in pods)
    for f in relay.failing:
        assert f.reason == "CrashLoopBackOff"
        assert f.diagnosis is not None
        assert f.diagnosis.kind is Cause.CRASH_LOOP, f.diagnosis
        assert f.diagnosis.pod == f.name
