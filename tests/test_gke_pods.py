"""Pods meet what GKE's scheduler and kubelet do beyond the happy path.

The scheduler retries like kube-scheduler: a Pending pod is bound as soon as a node can take it (a node
relabelled or joining, a pod gone). Init containers that keep failing under restartPolicy Always or
OnFailure are restarted after the kubelet's back-off (Init:CrashLoopBackOff, its `back-off 10s …` texts)
and the pod stays Pending. The bot reports a rollout whose new pods no node can hold, or whose new init
container keeps failing, in seconds with the cause, instead of at the progress deadline."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from bot.adapters.diagnosis import Cause, Diagnoser
from bot.adapters.jobs import JobStuck, run_job
from bot.adapters.kube import KubeClients
from bot.adapters.rollout import RolloutFailed, watch_rollout
from bot.settings import Environment
from tests.testbed.gitrepos import AppRemote
from tests.testbed.kube.cluster import SimCluster, Timings
from tests.testbed.kube.printers import pod_status_text
from tests.testbed.registry import Registries

NS = "funnelcake"
LONG = 1800.0  # the rollout limit a slow cluster may need; the cause must come long before
SCHEMA_ERROR = "schema-check: table funnelcake.events has no column user_agent (want migration 000007)"


@pytest.fixture
def sim_timings() -> Timings:
    # progress deadlines as on GKE (600 s), so only a diagnosis can end a stuck rollout early
    return dataclasses.replace(Timings.fast(), deadline_scale=1.0)


def _relabel(cluster: SimCluster, arch: str, nodes: list[str] | None = None) -> None:
    for node in cluster.store.list("nodes")[0]:
        if nodes is not None and node["metadata"]["name"] not in nodes:
            continue

        def label(obj: dict[str, Any]) -> None:
            obj["metadata"]["labels"]["kubernetes.io/arch"] = arch

        cluster.store.update("nodes", "", node["metadata"]["name"], label)


async def _until(check: Callable[[], bool], limit: float = 10.0) -> None:
    async with asyncio.timeout(limit):
        while not check():
            await asyncio.sleep(0.05)


def _pod(cluster: SimCluster, name: str) -> dict[str, Any]:
    pod = cluster.store.get("pods", NS, name)
    assert pod is not None
    return pod


def _scheduled(pod: dict[str, Any]) -> bool | None:
    """PodScheduled as a bool; None before the scheduler has looked at the pod."""
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c["type"] == "PodScheduled":
            return bool(c["status"] == "True")
    return None


def _bare_pod(name: str, **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "c", "image": "registry.k8s.io/pause:3.10"}
    if "cpu" in spec:
        container["resources"] = {"requests": {"cpu": spec.pop("cpu")}}
    return {"metadata": {"name": name, "namespace": NS}, "spec": {"containers": [container], **spec}}


async def test_a_pending_pod_is_scheduled_once_a_node_matches_it(sim_cluster: SimCluster) -> None:
    _relabel(sim_cluster, "arm64")
    sim_cluster.store.create("pods", _bare_pod("wants-amd64", nodeSelector={"kubernetes.io/arch": "amd64"}))
    # nothing takes it at first: Pending with the scheduler's reason
    await _until(lambda: _scheduled(_pod(sim_cluster, "wants-amd64")) is False)
    pod = _pod(sim_cluster, "wants-amd64")
    assert pod["status"]["phase"] == "Pending"
    assert "didn't match Pod's node affinity/selector" in pod["status"]["conditions"][0]["message"]
    # one node gets the label (a node pool with it joined): the scheduler tries again and binds the pod
    first = sim_cluster.store.list("nodes")[0][0]["metadata"]["name"]
    _relabel(sim_cluster, "amd64", [first])
    await _until(lambda: _pod(sim_cluster, "wants-amd64")["status"].get("phase") == "Running")
    placed = _pod(sim_cluster, "wants-amd64")
    assert placed["spec"]["nodeName"] == first
    assert {c["type"]: c["status"] for c in placed["status"]["conditions"]}["PodScheduled"] == "True"
    events, _ = sim_cluster.store.list("events", NS, field_selector="involvedObject.name=wants-amd64")
    reasons = [e["reason"] for e in events]
    assert reasons[0] == "FailedScheduling"
    assert {"Scheduled", "Started"} <= set(reasons)


async def test_a_pod_waiting_for_room_is_scheduled_when_another_pod_goes(sim_cluster: SimCluster) -> None:
    # two pods fill both nodes' CPU (3920m allocatable each)
    for name in ("hog-a", "hog-b"):
        sim_cluster.store.create("pods", _bare_pod(name, cpu="3"))
    await _until(lambda: all(_scheduled(_pod(sim_cluster, n)) for n in ("hog-a", "hog-b")))
    sim_cluster.store.create("pods", _bare_pod("waiting", cpu="2"))
    await _until(lambda: _scheduled(_pod(sim_cluster, "waiting")) is False)
    waiting = _pod(sim_cluster, "waiting")
    assert "2 Insufficient cpu" in waiting["status"]["conditions"][0]["message"]
    freed = _pod(sim_cluster, "hog-a")["spec"]["nodeName"]
    sim_cluster.store.delete("pods", NS, "hog-a", grace_period=0)
    await _until(lambda: bool(_pod(sim_cluster, "waiting")["spec"].get("nodeName")))
    assert _pod(sim_cluster, "waiting")["spec"]["nodeName"] == freed


async def test_a_rollout_no_node_can_hold_is_diagnosed_in_seconds_not_at_the_deadline(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    app_remote: AppRemote,
    registries: Registries,
) -> None:
    tag = app_remote.short("head")
    await registries.push("staging", "funnelcake-api", tag, "amd64", seed="api-head")

    def bigger(dep: dict[str, Any]) -> None:
        # the new release asks for more CPU than any e2-standard-4 node has
        container = dep["spec"]["template"]["spec"]["containers"][0]
        container["image"] = staging.image_ref("funnelcake-api", tag)
        container["resources"] = {"requests": {"cpu": "6"}}

    sim_cluster.store.update("deployments", NS, "funnelcake-api", bigger)
    async with asyncio.timeout(10):  # a bound on the wait: the progress deadline is far beyond it
        with pytest.raises(RolloutFailed) as err:
            await watch_rollout(
                staging_clients[staging.kube_context],
                NS,
                "funnelcake-api",
                diagnoser=Diagnoser(staging),
                give_up_after=LONG,
            )
    assert "cannot be scheduled: 0/2 nodes are available: 2 Insufficient cpu" in str(err.value)
    d = err.value.diagnosis
    assert d is not None and d.kind is Cause.PENDING
    assert "Insufficient cpu" in d.evidence
    assert "lower its resources.requests" in d.fix
    # the old pods keep serving: the rolling update never took them down
    dep = sim_cluster.store.get("deployments", NS, "funnelcake-api")
    assert dep is not None and dep["status"].get("availableReplicas", 0) >= 1


def failing_init(cluster: SimCluster, name: str, text: str = SCHEMA_ERROR) -> list[str]:
    """Make every init container called `name` exit 1 with `text`; the list records each run."""
    runs: list[str] = []

    async def program(pod: dict[str, Any], container: dict[str, Any], env: dict[str, str]) -> tuple[int, str]:
        runs.append(pod["metadata"]["name"])
        return 1, text + "\n"

    cluster.kubelet.init_programs.insert(0, (lambda spec: spec.get("name") == name, program))
    return runs


def _init_status(cluster: SimCluster, pod: str) -> dict[str, Any]:
    obj = cluster.store.get("pods", NS, pod)
    assert obj is not None
    statuses = (obj.get("status") or {}).get("initContainerStatuses") or [{}]
    return dict(statuses[0])


async def test_an_init_container_failing_again_and_again_backs_off_like_the_kubelet(
    sim_cluster: SimCluster,
) -> None:
    runs = failing_init(sim_cluster, "schema-check")
    sim_cluster.store.create(
        "pods",
        {
            "metadata": {"name": "api-with-check", "namespace": NS},
            "spec": {
                "restartPolicy": "Always",
                "initContainers": [{"name": "schema-check", "image": "registry.k8s.io/busybox:1.36"}],
                "containers": [{"name": "api", "image": "registry.k8s.io/pause:3.10"}],
            },
        },
    )
    await _until(lambda: _init_status(sim_cluster, "api-with-check").get("restartCount", 0) >= 3)
    pod = sim_cluster.store.get("pods", NS, "api-with-check")
    assert pod is not None
    cs = pod["status"]["initContainerStatuses"][0]
    # the pod never gets past its init container: Pending, the app container not started
    assert pod["status"]["phase"] == "Pending"
    assert pod["status"]["containerStatuses"][0]["state"] == {"waiting": {"reason": "PodInitializing"}}
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    waiting = cs["state"].get("waiting")
    if waiting is not None:  # between two runs (else it is running again)
        assert waiting["reason"] == "CrashLoopBackOff"
        assert pod_status_text(pod) == "Init:CrashLoopBackOff"
        # the back-off doubles from 10s, as the kubelet's does: 10s, 20s, 40s, …
        secs = {1: "10s", 2: "20s", 3: "40s", 4: "1m20s", 5: "2m40s"}.get(cs["restartCount"], "5m0s")
        assert waiting["message"].startswith(f"back-off {secs} restarting failed container=schema-check ")
    assert len(runs) >= 3
    events, _ = sim_cluster.store.list("events", NS, field_selector="involvedObject.name=api-with-check")
    backoff = [e for e in events if e["reason"] == "BackOff"]
    assert backoff and backoff[0]["message"].startswith(
        "Back-off restarting failed container schema-check in pod api-with-check_funnelcake("
    )
    assert backoff[0]["involvedObject"]["fieldPath"] == "spec.initContainers{schema-check}"
    created = [e for e in events if e["reason"] == "Created"]
    assert created and created[0]["count"] >= 3  # one Created per run of the init container
    # its previous run's log is there for `kubectl logs --previous`
    assert sim_cluster.store.get_log(NS, "api-with-check", "schema-check", previous=True).startswith(
        "schema-check:"
    )


async def test_a_rollout_whose_new_init_container_keeps_failing_is_diagnosed_with_its_log(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    app_remote: AppRemote,
    registries: Registries,
) -> None:
    failing_init(sim_cluster, "schema-check")
    tag = app_remote.short("head")
    await registries.push("staging", "funnelcake-api", tag, "amd64", seed="api-head")

    def with_check(dep: dict[str, Any]) -> None:
        # the release adds an init container that checks the schema before the API starts
        pod_spec = dep["spec"]["template"]["spec"]
        pod_spec["containers"][0]["image"] = staging.image_ref("funnelcake-api", tag)
        pod_spec["initContainers"] = [
            {"name": "schema-check", "image": staging.image_ref("funnelcake-api", tag)}
        ]

    sim_cluster.store.update("deployments", NS, "funnelcake-api", with_check)
    async with asyncio.timeout(10):  # a bound on the wait: the progress deadline is 600 s away
        with pytest.raises(RolloutFailed) as err:
            await watch_rollout(
                staging_clients[staging.kube_context],
                NS,
                "funnelcake-api",
                diagnoser=Diagnoser(staging),
                give_up_after=LONG,
            )
    assert "CrashLoopBackOff" in str(err.value)
    d = err.value.diagnosis
    assert d is not None and d.kind is Cause.CRASH_LOOP
    assert d.cause.startswith("init container schema-check keeps failing (exit code 1, ")
    assert "never start (Init:CrashLoopBackOff)" in d.cause
    assert SCHEMA_ERROR in d.evidence
    assert "-c schema-check --previous" in d.fix


async def test_a_job_whose_init_container_restarts_on_failure_is_reported_at_once(
    sim_cluster: SimCluster, staging_clients: KubeClients, staging: Environment
) -> None:
    failing_init(sim_cluster, "fetch", "fatal: could not read Username for 'https://github.com'")
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "funnelcake-fetch", "namespace": NS},
        "spec": {
            "backoffLimit": 1,
            "template": {
                "spec": {
                    "restartPolicy": "OnFailure",
                    "initContainers": [{"name": "fetch", "image": "alpine/git:2.45.2"}],
                    "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.10"}],
                }
            },
        },
    }
    client = staging_clients[staging.kube_context]
    async with asyncio.timeout(10):  # the kubelet would retry it forever: the bot must not wait
        with pytest.raises(JobStuck) as err:
            await run_job(client, job, container="main", what="fetch", limit=LONG)
    assert "init container fetch failed (exit code 1, Error), so it never started" in str(err.value)
    assert "could not read Username" in (err.value.hint or "")
    # the bot deleted the Job that would have sat there
    await _until(lambda: sim_cluster.store.get("jobs", NS, "funnelcake-fetch") is None)
