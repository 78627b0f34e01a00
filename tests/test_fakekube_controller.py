"""The simulated cluster behaves like GKE + Argo CD as the bot sees it: through the HTTP API, with kubernetes_asyncio."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.testbed.gitrepos import AppRemote, GitOpsRemote, overlay_path, push_from_second_clone, remote_head
from tests.testbed.kube.cluster import SimCluster, SimClusters, Timings
from tests.testbed.kube.kubeconfig import write_kubeconfig
from tests.testbed.registry import Registries

NS = "funnelcake"
ARGO = ("argoproj.io", "v1alpha1", "argocd", "applications")
MERGE = "application/merge-patch+json"
REFRESH = "argocd.argoproj.io/refresh"


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture
async def kube(sim_cluster: SimCluster, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    """A kubernetes_asyncio client for the simulated staging cluster, as the bot builds one."""
    path = write_kubeconfig(tmp_path / "kubeconfig", {"staging": sim_cluster.url})
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(path), context="staging", client_configuration=cfg)
    async with client.ApiClient(cfg) as api:
        yield api
    assert sim_cluster.errors == []


async def eventually(
    check: Callable[[], Awaitable[Any]], *, within: float = 5.0, what: str = "condition"
) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while True:
        try:
            last = await check()
        except AssertionError as e:
            last = e
        else:
            if last:
                return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {within}s; last: {last!r}")
        await asyncio.sleep(0.01)


def plain(api: client.ApiClient, obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = api.sanitize_for_serialization(obj)
    return out


async def get_app(api: client.ApiClient, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = await client.CustomObjectsApi(api).get_namespaced_custom_object(*ARGO, name)
    return obj


async def patch_app(api: client.ApiClient, name: str, body: dict[str, Any]) -> dict[str, Any]:
    # kubernetes_asyncio would send json-patch for a dict body
    obj: dict[str, Any] = await client.CustomObjectsApi(api).patch_namespaced_custom_object(
        *ARGO, name, body, _content_type=MERGE
    )
    return obj


async def get_deployment(api: client.ApiClient, name: str) -> dict[str, Any]:
    return plain(api, await client.AppsV1Api(api).read_namespaced_deployment(name, NS))


async def pods_of(api: client.ApiClient, service: str) -> list[dict[str, Any]]:
    pods = await client.CoreV1Api(api).list_namespaced_pod(
        NS, label_selector=f"app.kubernetes.io/name=funnelcake-{service}"
    )
    return [plain(api, p) for p in pods.items]


def rollout_state(dep: dict[str, Any]) -> str:
    """What `kubectl rollout status` concludes from one Deployment."""
    spec, status = dep.get("spec") or {}, dep.get("status") or {}
    if dep["metadata"].get("generation", 0) > status.get("observedGeneration", 0):
        return "waiting: generation"
    for cond in status.get("conditions") or []:
        if cond["type"] == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "failed: deadline"
    replicas = spec.get("replicas", 1)
    if status.get("updatedReplicas", 0) < replicas:
        return "waiting: updated"
    if status.get("replicas", 0) > status.get("updatedReplicas", 0):
        return "waiting: old terminating"
    if status.get("availableReplicas", 0) < status.get("updatedReplicas", 0):
        return "waiting: available"
    return "done"


def waiting_reason(pod: dict[str, Any], container: str) -> str | None:
    for s in (pod.get("status") or {}).get("containerStatuses") or []:
        if s["name"] == container:
            return ((s.get("state") or {}).get("waiting") or {}).get("reason")
    return None


def bump_overlay(gitops: GitOpsRemote, service: str, env: str, new_tag: str) -> str:
    """A colleague bumps the overlay's newTag and pushes to main (the bot's gitops step, by hand)."""
    old_tag = gitops.tags[env]

    def edit(text: str) -> str:
        assert old_tag in text
        return text.replace(old_tag, new_tag)

    sha = push_from_second_clone(
        gitops.url, overlay_path(service, env), edit, f"deploy({env}): funnelcake @ {new_tag}"
    )
    return sha


def image(cluster: SimCluster, service: str, tag: str) -> str:
    return cluster.image_ref(f"funnelcake-{service}", tag)


async def sync(api: client.ApiClient, name: str, revision: str, who: str = "U123") -> str:
    """Patch `operation` like the bot: returns the request time (second resolution, like startedAt)."""
    requested = dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    await patch_app(
        api, name, {"operation": {"initiatedBy": {"username": who}, "sync": {"revision": revision}}}
    )
    return requested


async def finished_op(
    api: client.ApiClient, name: str, revision: str, *, within: float = 5.0
) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        app = await get_app(api, name)
        state = (app.get("status") or {}).get("operationState") or {}
        op_rev = ((state.get("operation") or {}).get("sync") or {}).get("revision")
        if op_rev == revision and state.get("phase") in ("Succeeded", "Failed", "Error"):
            return app
        return None

    app: dict[str, Any] = await eventually(check, within=within, what=f"operation on {revision[:7]} finished")
    return app


# --------------------------------------------------------------------------------------- the seed


async def test_seeded_cluster_runs_the_gitops_head(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote
) -> None:
    head = remote_head(sim_gitops.url)
    for service in ("api", "relay"):
        app = await get_app(kube, f"funnelcake-{service}")
        assert app["status"]["sync"] == {
            "status": "Synced",
            "revision": head,
            "comparedTo": app["status"]["sync"]["comparedTo"],
        }
        assert app["status"]["health"]["status"] == "Healthy"
        assert app["spec"]["source"]["path"] == f"k8s/applications/funnelcake-{service}/overlays/staging"
        assert app["status"]["operationState"]["phase"] == "Succeeded"
        dep = await get_deployment(kube, f"funnelcake-{service}")
        assert rollout_state(dep) == "done"
        assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == image(
            sim_cluster, service, sim_gitops.tags["staging"]
        )
        pods = await pods_of(kube, service)
        assert len(pods) == 2
        for pod in pods:
            assert pod["status"]["phase"] == "Running"
            assert all(s["ready"] for s in pod["status"]["containerStatuses"])
            assert pod["metadata"]["name"].startswith(f"funnelcake-{service}-")
            assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
            assert "pod-template-hash" in pod["metadata"]["labels"]
    secret = await client.CoreV1Api(kube).read_namespaced_secret("funnelcake-clickhouse-credentials", NS)
    assert set(secret.data) == {
        "CLICKHOUSE_URL",
        "CLICKHOUSE_USER",
        "CLICKHOUSE_PASSWORD",
        "CLICKHOUSE_DATABASE",
    }
    assert "testbed-fake" in base64.b64decode(secret.data["CLICKHOUSE_PASSWORD"]).decode()
    # staging runs add-index: three migrations applied
    assert sim_cluster.clickhouse.version == 3
    assert not sim_cluster.clickhouse.dirty


# ------------------------------------------------------------------------------------------ Argo CD


async def test_refresh_is_consumed_with_a_newer_reconciled_at(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote, registries: Registries
) -> None:
    before = await get_app(kube, "funnelcake-api")
    prev_reconciled = before["status"]["reconciledAt"]
    await patch_app(kube, "funnelcake-api", {"metadata": {"annotations": {REFRESH: "hard"}}})

    async def consumed() -> dict[str, Any] | None:
        app = await get_app(kube, "funnelcake-api")
        gone = REFRESH not in (app["metadata"].get("annotations") or {})
        return app if gone and app["status"]["reconciledAt"] > prev_reconciled else None

    app = await eventually(consumed, what="refresh consumed")
    assert app["status"]["sync"]["status"] == "Synced"

    # a push to main does not deploy (F2): the app only turns OutOfSync at the new revision
    new_sha = await asyncio.to_thread(bump_overlay, sim_gitops, "api", "staging", "abc1234")
    await asyncio.sleep(0.1)
    assert (await get_app(kube, "funnelcake-api"))["status"]["sync"]["revision"] != new_sha
    prev_reconciled = app["status"]["reconciledAt"]
    await patch_app(kube, "funnelcake-api", {"metadata": {"annotations": {REFRESH: "normal"}}})
    app = await eventually(consumed, what="second refresh consumed")
    assert app["status"]["sync"] == {**app["status"]["sync"], "status": "OutOfSync", "revision": new_sha}
    assert app["status"]["health"]["status"] == "Healthy"  # nothing changed in the cluster
    dep = await get_deployment(kube, "funnelcake-api")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(
        f":{sim_gitops.tags['staging']}"
    )


async def test_sync_to_a_present_amd64_tag_rolls_out(
    sim_cluster: SimCluster,
    kube: client.ApiClient,
    sim_gitops: GitOpsRemote,
    registries: Registries,
    app_remote: AppRemote,
) -> None:
    tag = app_remote.short("head")
    await registries.push("staging", "funnelcake-api", tag, "multi", seed="head")
    sha = await asyncio.to_thread(bump_overlay, sim_gitops, "api", "staging", tag)
    previous = (await get_app(kube, "funnelcake-api"))["status"]["operationState"]
    old_pods = {p["metadata"]["name"] for p in await pods_of(kube, "api")}

    requested = await sync(kube, "funnelcake-api", sha)
    # right after the patch the PREVIOUS operation is still what operationState shows
    right_after = await get_app(kube, "funnelcake-api")
    assert right_after["operation"]["sync"]["revision"] == sha
    assert right_after["status"]["operationState"] == previous

    async def running() -> dict[str, Any] | None:
        state = (await get_app(kube, "funnelcake-api"))["status"]["operationState"]
        return state if state["phase"] == "Running" else None

    state = await eventually(running, what="operation Running")
    assert state["operation"]["sync"]["revision"] == sha
    assert state["startedAt"] >= requested

    app = await finished_op(kube, "funnelcake-api", sha)
    state = app["status"]["operationState"]
    assert state["phase"] == "Succeeded"
    assert state["syncResult"]["revision"] == sha
    assert "operation" not in app  # cleared in the same write as the final phase
    assert state["finishedAt"] >= state["startedAt"]

    async def healthy() -> dict[str, Any] | None:
        a = await get_app(kube, "funnelcake-api")
        s = a["status"]
        ok = s["sync"]["status"] == "Synced" and s["health"]["status"] == "Healthy"
        return a if ok and s["sync"]["revision"] == sha else None

    app = await eventually(healthy, what="Synced/Healthy")
    assert app["status"]["reconciledAt"] >= state["finishedAt"]
    dep = await get_deployment(kube, "funnelcake-api")
    assert rollout_state(dep) == "done"
    listed = await pods_of(kube, "api")
    # as on GKE, the replaced pods may still be listed, Terminating, for their containers' stop time
    assert all(p["metadata"]["name"] in old_pods for p in listed if p["metadata"].get("deletionTimestamp"))
    pods = [p for p in listed if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 2
    assert not {p["metadata"]["name"] for p in pods} & old_pods
    for pod in pods:
        (status,) = pod["status"]["containerStatuses"]
        assert status["image"] == image(sim_cluster, "api", tag)
        assert status["ready"] and "running" in status["state"]
        assert status["imageID"].endswith(status["imageID"].split("@")[-1])
    # the other service was not touched
    relay = await get_app(kube, "funnelcake-relay")
    assert relay["status"]["operationState"]["operation"]["initiatedBy"]["username"] == "platform-team"


async def test_operation_patched_while_running_is_dropped(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote, registries: Registries
) -> None:
    assert sim_cluster.controller is not None
    argocd = sim_cluster.controller.argocd
    argocd.timings = dataclasses.replace(argocd.timings, argo_sync=1.0)
    head = remote_head(sim_gitops.url)
    await sync(kube, "funnelcake-relay", head, who="first")

    async def running() -> bool:
        state = (await get_app(kube, "funnelcake-relay"))["status"]["operationState"]
        return state["phase"] == "Running" and state["operation"]["initiatedBy"]["username"] == "first"

    await eventually(running, what="first operation Running")
    await sync(kube, "funnelcake-relay", head, who="second")
    assert (await get_app(kube, "funnelcake-relay"))["operation"]["initiatedBy"]["username"] == "second"

    app = await finished_op(kube, "funnelcake-relay", head)
    assert app["status"]["operationState"]["operation"]["initiatedBy"]["username"] == "first"
    assert "operation" not in app
    await asyncio.sleep(0.3)  # long enough for a second operation to have started (argo_reconcile 0.02 s)
    app = await get_app(kube, "funnelcake-relay")
    assert app["status"]["operationState"]["operation"]["initiatedBy"]["username"] == "first"
    assert app["status"]["operationState"]["phase"] == "Succeeded"
    assert len(app["status"]["history"]) == 2  # the seed's sync and ours, no third


async def test_sync_to_an_unknown_revision_errors(sim_cluster: SimCluster, kube: client.ApiClient) -> None:
    await sync(kube, "funnelcake-api", "0" * 40)
    app = await finished_op(kube, "funnelcake-api", "0" * 40)
    state = app["status"]["operationState"]
    assert state["phase"] == "Error"
    assert "unable to resolve" in state["message"]
    assert "operation" not in app


# ------------------------------------------------------------------------------- image pull failures


async def _deploy_and_watch_pull(
    cluster: SimCluster, api: client.ApiClient, gitops: GitOpsRemote, tag: str
) -> tuple[dict[str, Any], list[str]]:
    """Sync the api to `tag`; returns a new pod once it is in ImagePullBackOff, and the reasons seen on the way."""
    sha = await asyncio.to_thread(bump_overlay, gitops, "api", "staging", tag)
    reasons: list[str] = []
    want = image(cluster, "api", tag)

    async def observe() -> dict[str, Any]:
        w = watch.Watch()
        async for event in w.stream(
            client.CoreV1Api(api).list_namespaced_pod,
            NS,
            label_selector="app.kubernetes.io/name=funnelcake-api",
            timeout_seconds=10,
        ):
            pod = plain(api, event["object"])
            if pod["spec"]["containers"][0]["image"] != want:
                continue
            reason = waiting_reason(pod, "api")
            if reason and (not reasons or reasons[-1] != reason):
                reasons.append(reason)
            if reason == "ImagePullBackOff":
                w.stop()
                return pod
        raise AssertionError(f"no ImagePullBackOff seen; reasons {reasons}")

    watcher = asyncio.create_task(observe())
    await sync(api, "funnelcake-api", sha)
    pod = await asyncio.wait_for(watcher, 10)
    await finished_op(api, "funnelcake-api", sha)
    return pod, reasons


async def _pull_failure_events(api: client.ApiClient, pod: dict[str, Any]) -> list[dict[str, Any]]:
    events = await client.CoreV1Api(api).list_namespaced_event(
        NS, field_selector=f"involvedObject.name={pod['metadata']['name']},involvedObject.kind=Pod"
    )
    return [plain(api, e) for e in events.items]


# 600 s progressDeadlineSeconds x 0.1 = 60 s: far beyond this test, so the deadline cannot have passed
@pytest.mark.parametrize("sim_timings", [dataclasses.replace(Timings.fast(), deadline_scale=0.1)])
async def test_missing_tag_image_pull_backoff_progressing_until_deadline(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote
) -> None:
    tag = "deadbee"
    img = image(sim_cluster, "api", tag)
    pod, reasons = await _deploy_and_watch_pull(sim_cluster, kube, sim_gitops, tag)
    assert reasons[-2:] == ["ErrImagePull", "ImagePullBackOff"]
    events = await _pull_failure_events(kube, pod)
    by_reason = {e["reason"]: e for e in events}
    assert {"Scheduled", "Pulling", "Failed", "BackOff"} <= set(by_reason)
    failed = next(e for e in events if e["reason"] == "Failed" and e["message"].startswith("Failed to pull"))
    assert failed["message"] == (
        f'Failed to pull image "{img}": rpc error: code = NotFound desc = failed to pull and unpack image '
        f'"{img}": failed to resolve reference "{img}": {img}: not found'
    )
    assert failed["type"] == "Warning"
    assert failed["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": pod["metadata"]["name"],
        "namespace": NS,
        "uid": pod["metadata"]["uid"],
        "resourceVersion": failed["involvedObject"]["resourceVersion"],
        "fieldPath": "spec.containers{api}",
    }
    assert by_reason["BackOff"]["message"] == f'Back-off pulling image "{img}"'

    # the old pods keep serving; Argo says Progressing (not Degraded) until the progress deadline, once
    # its health check has looked at the new ReplicaSet
    async def progressing() -> dict[str, Any] | None:
        a = await get_app(kube, "funnelcake-api")
        return a if a["status"]["health"]["status"] == "Progressing" else None

    await eventually(progressing, within=5, what="Argo CD reporting Progressing")
    dep = await get_deployment(kube, "funnelcake-api")
    assert rollout_state(dep) == "waiting: updated"
    assert dep["status"]["availableReplicas"] == 2
    assert dep["status"]["updatedReplicas"] == 1
    assert dep["status"]["replicas"] == 3
    assert dep["status"]["unavailableReplicas"] == 1  # 3 pods in the ReplicaSets, 2 available

    # pulls keep being retried, with aggregated events
    async def retried() -> bool:
        backoffs = [e for e in await _pull_failure_events(kube, pod) if e["reason"] == "BackOff"]
        return max((e["count"] for e in backoffs), default=0) >= 2

    await eventually(retried, within=5, what="the pull retried")


async def test_missing_tag_is_degraded_after_the_progress_deadline(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote
) -> None:
    before_sync = asyncio.get_running_loop().time()
    await _deploy_and_watch_pull(sim_cluster, kube, sim_gitops, "deadbee")

    async def degraded() -> dict[str, Any] | None:
        a = await get_app(kube, "funnelcake-api")
        return a if a["status"]["health"]["status"] == "Degraded" else None

    # 600 s progressDeadlineSeconds x deadline_scale 0.002 = 1.2 s after the last progress (the new pod)
    await eventually(degraded, within=5, what="Degraded after the deadline")
    assert asyncio.get_running_loop().time() - before_sync >= 1.2
    dep = await get_deployment(kube, "funnelcake-api")
    assert rollout_state(dep) == "failed: deadline"
    progressing = next(c for c in dep["status"]["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "False"
    assert progressing["message"].endswith("has timed out progressing.")


async def test_arm64_only_image_has_no_platform_match(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote, registries: Registries
) -> None:
    tag = "a4a4a4a"
    await registries.push("staging", "funnelcake-api", tag, "arm64")
    img = image(sim_cluster, "api", tag)
    pod, _ = await _deploy_and_watch_pull(sim_cluster, kube, sim_gitops, tag)
    messages = [e["message"] for e in await _pull_failure_events(kube, pod)]
    assert (
        f'Failed to pull image "{img}": rpc error: code = NotFound desc = failed to pull and unpack image '
        f'"{img}": no match for platform in manifest: not found'
    ) in messages


async def test_denied_registry_is_403(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote, registries: Registries
) -> None:
    tag = "d3d3d3d"
    await registries.push("staging", "funnelcake-api", tag, "amd64")
    sim_cluster.deny_registry_pulls = True
    pod, _ = await _deploy_and_watch_pull(sim_cluster, kube, sim_gitops, tag)
    failed = [
        e["message"]
        for e in await _pull_failure_events(kube, pod)
        if e["message"].startswith("Failed to pull")
    ]
    assert failed
    assert failed[0].endswith("403 Forbidden")
    assert "code = Unknown" in failed[0]

    # access restored: the kubelet's retry pulls it and the rollout completes
    sim_cluster.deny_registry_pulls = False

    async def done() -> bool:
        return rollout_state(await get_deployment(kube, "funnelcake-api")) == "done"

    await eventually(done, within=5, what="rollout after access restored")


async def test_crash_loop_with_exec_format_error(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote, registries: Registries
) -> None:
    tag = "e4e4e4e"
    await registries.push("staging", "funnelcake-api", tag, "amd64")
    sim_cluster.exec_format_tags.add(tag)
    sha = await asyncio.to_thread(bump_overlay, sim_gitops, "api", "staging", tag)
    await sync(kube, "funnelcake-api", sha)
    await finished_op(kube, "funnelcake-api", sha)

    async def crashing() -> dict[str, Any] | None:
        for pod in await pods_of(kube, "api"):
            (s,) = pod["status"].get("containerStatuses") or [{}]
            restarted = s.get("image", "").endswith(tag) and s.get("restartCount", 0) >= 2
            if restarted and waiting_reason(pod, "api") == "CrashLoopBackOff":
                return pod
        return None

    pod = await eventually(crashing, within=5, what="CrashLoopBackOff with restarts")
    (s,) = pod["status"]["containerStatuses"]
    assert s["lastState"]["terminated"]["exitCode"] == 1
    assert not s["ready"]
    assert pod["status"]["phase"] == "Running"
    core = client.CoreV1Api(kube)
    logs = await core.read_namespaced_pod_log(pod["metadata"]["name"], NS, container="api", previous=True)
    assert logs.strip() == "exec /usr/local/bin/funnelcake-api: exec format error"
    assert (await get_app(kube, "funnelcake-api"))["status"]["health"]["status"] == "Progressing"


async def test_invalid_image_name(sim_cluster: SimCluster, kube: client.ApiClient) -> None:
    bad = f"{sim_cluster.registry_prefix}/Funnelcake-API:oops"
    await client.AppsV1Api(kube).patch_namespaced_deployment(
        "funnelcake-api",
        NS,
        {"spec": {"template": {"spec": {"containers": [{"name": "api", "image": bad}]}}}},
    )

    async def invalid() -> dict[str, Any] | None:
        for pod in await pods_of(kube, "api"):
            if waiting_reason(pod, "api") == "InvalidImageName":
                return pod
        return None

    pod = await eventually(invalid, what="InvalidImageName")
    events = await _pull_failure_events(kube, pod)
    assert any(e["message"] == "Error: InvalidImageName" for e in events)
    # Argo CD notices the live Deployment drifted from git
    app = await get_app(kube, "funnelcake-api")
    assert app["status"]["sync"]["status"] == "OutOfSync"


# --------------------------------------------------------------------------------- rollout semantics


async def test_deployment_status_follows_rollout_status_semantics(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote, registries: Registries
) -> None:
    tag = "f5f5f5f"
    await registries.push("staging", "funnelcake-relay", tag, "amd64")
    sha = await asyncio.to_thread(bump_overlay, sim_gitops, "relay", "staging", tag)
    states: list[str] = []
    statuses: list[dict[str, Any]] = []

    async def observe() -> None:
        w = watch.Watch()
        async for event in w.stream(
            client.AppsV1Api(kube).list_namespaced_deployment,
            NS,
            field_selector="metadata.name=funnelcake-relay",
            timeout_seconds=10,
        ):
            dep = plain(kube, event["object"])
            if not dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(tag):
                continue
            statuses.append(dep["status"])
            state = rollout_state(dep)
            if not states or states[-1] != state:
                states.append(state)
            if state == "done":
                w.stop()
                return

    watcher = asyncio.create_task(observe())
    await sync(kube, "funnelcake-relay", sha)
    await asyncio.wait_for(watcher, 10)
    assert states[0] == "waiting: generation"
    assert states[-1] == "done"
    assert "waiting: updated" in states
    assert "failed: deadline" not in states
    # with 2 replicas, maxSurge 25% -> 1 and maxUnavailable 25% -> 0: never fewer than 2 available
    observed = [s for s in statuses if "availableReplicas" in s]
    assert all(s["availableReplicas"] >= 2 for s in observed)
    assert max(s["replicas"] for s in observed) == 3
    final = statuses[-1]
    assert final["updatedReplicas"] == final["replicas"] == final["readyReplicas"] == 2
    reasons = {c["type"]: c["reason"] for c in final["conditions"]}
    assert reasons == {"Available": "MinimumReplicasAvailable", "Progressing": "NewReplicaSetAvailable"}
    events = await client.CoreV1Api(kube).list_namespaced_event(
        NS, field_selector="involvedObject.kind=Deployment,involvedObject.name=funnelcake-relay"
    )
    scaling = [e.message for e in events.items if e.reason == "ScalingReplicaSet"]
    assert any(m.startswith("Scaled up replica set funnelcake-relay-") for m in scaling)
    assert any(m.startswith("Scaled down") for m in scaling)


# ------------------------------------------------------------------------------------ migrate Jobs


def migrate_job(
    cluster: SimCluster, tag: str, args: list[str], *, backoff_limit: int = 3, cloud_url: bool = False
) -> dict[str, Any]:
    """Job funnelcake-db-migrate as the bot builds it."""
    secret = "funnelcake-clickhouse-credentials"

    def from_secret(key: str) -> dict[str, Any]:
        return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}

    env = [from_secret(k) for k in ("CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DATABASE")]
    if cloud_url:
        env.append(from_secret("CLICKHOUSE_URL"))
    else:
        env += [
            {
                "name": "CLICKHOUSE_HOST",
                "value": "funnelcake-funnelcake-clickhouse.funnelcake.svc.cluster.local",
            },
            {"name": "CLICKHOUSE_PORT", "value": "9000"},
        ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "funnelcake-db-migrate", "namespace": NS},
        "spec": {
            "backoffLimit": backoff_limit,
            "ttlSecondsAfterFinished": 600,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "migrate",
                            "image": cluster.image_ref("funnelcake-migrate", tag),
                            "args": args,
                            "env": env,
                        }
                    ],
                }
            },
        },
    }


async def run_job(api: client.ApiClient, job: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Create the Job, wait for Complete/Failed, return its status and each pod's log (oldest first); delete it."""
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    created = await batch.create_namespaced_job(NS, job)

    async def finished() -> dict[str, Any] | None:
        j = plain(api, await batch.read_namespaced_job(job["metadata"]["name"], NS))
        conds = {c["type"] for c in j["status"].get("conditions") or [] if c["status"] == "True"}
        return j if conds & {"Complete", "Failed"} else None

    done: dict[str, Any] = await eventually(finished, within=8, what="job finished")
    pods = await core.list_namespaced_pod(
        NS, label_selector=f"batch.kubernetes.io/controller-uid={created.metadata.uid}"
    )
    ordered = sorted((plain(api, p) for p in pods.items), key=lambda p: int(p["metadata"]["resourceVersion"]))
    ordered.sort(key=lambda p: p["metadata"]["creationTimestamp"])
    logs = [
        await core.read_namespaced_pod_log(p["metadata"]["name"], NS, container="migrate") for p in ordered
    ]
    await batch.delete_namespaced_job(job["metadata"]["name"], NS, propagation_policy="Background")
    return done, logs


async def test_migrate_up_applies_pending_then_no_change(
    sim_cluster: SimCluster, kube: client.ApiClient, app_remote: AppRemote, sim_gitops: GitOpsRemote
) -> None:
    tag = sim_gitops.tags["staging"]  # add-index: migrations 1..3, image already in the registry
    sim_cluster.clickhouse.version = 1
    job, logs = await run_job(kube, migrate_job(sim_cluster, tag, ["up"]))
    assert job["status"]["succeeded"] == 1
    assert job["status"]["completionTime"]
    assert "failed" not in job["status"]
    (log,) = logs
    lines = log.strip().splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["2/u create_tags", "3/u add_index"]
    assert all(ln.endswith("ms)") for ln in lines)
    assert sim_cluster.clickhouse.version == 3

    job, logs = await run_job(kube, migrate_job(sim_cluster, tag, ["up"]))
    assert logs == ["no change\n"]
    assert [c["type"] for c in job["status"]["conditions"]] == ["SuccessCriteriaMet", "Complete"]


async def test_migrate_dirty_then_force_then_up(
    sim_cluster: SimCluster, kube: client.ApiClient, app_remote: AppRemote, registries: Registries
) -> None:
    tag = app_remote.short("broken")
    await registries.push("staging", "funnelcake-migrate", tag, "amd64", seed="broken")
    job, logs = await run_job(kube, migrate_job(sim_cluster, tag, ["up"], backoff_limit=1))
    assert job["status"]["failed"] == 2
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    first, retry = logs
    assert first.startswith("error: migration failed in line 0: ")
    assert retry == "error: Dirty database version 4. Fix and force version.\n"
    assert (sim_cluster.clickhouse.version, sim_cluster.clickhouse.dirty) == (4, True)

    job, logs = await run_job(kube, migrate_job(sim_cluster, tag, ["force", "4"]))
    assert job["status"]["succeeded"] == 1
    assert (sim_cluster.clickhouse.version, sim_cluster.clickhouse.dirty) == (4, False)

    job, logs = await run_job(kube, migrate_job(sim_cluster, tag, ["up"]))
    assert logs == ["no change\n"]
    assert any("force 4" in h for h in sim_cluster.clickhouse.history)


async def test_migrate_with_clickhouse_url_on_self_hosted_times_out(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote
) -> None:
    version = sim_cluster.clickhouse.version
    job, logs = await run_job(
        kube, migrate_job(sim_cluster, sim_gitops.tags["staging"], ["up"], backoff_limit=2, cloud_url=True)
    )
    # backoffLimit 2: the first pod and two retries, then Failed — and no fourth pod
    assert job["status"]["failed"] == 3
    assert "active" not in job["status"]
    assert logs == ["error: dial tcp 10.0.0.12:9440: i/o timeout\n"] * 3
    assert sim_cluster.clickhouse.version == version
    pod_phases = {
        p.status.phase
        for p in (await client.CoreV1Api(kube).list_namespaced_pod(NS, label_selector="job-name")).items
    }
    assert pod_phases <= {"Failed"}


async def test_migrate_image_missing_leaves_job_active(
    sim_cluster: SimCluster, kube: client.ApiClient
) -> None:
    batch = client.BatchV1Api(kube)
    await batch.create_namespaced_job(NS, migrate_job(sim_cluster, "0badc0d", ["up"]))

    async def backoff() -> bool:
        pods = await pods_of_job(kube)
        return any(waiting_reason(p, "migrate") == "ImagePullBackOff" for p in pods)

    await eventually(backoff, what="migrate pod in ImagePullBackOff")
    job = plain(kube, await batch.read_namespaced_job("funnelcake-db-migrate", NS))
    assert job["status"]["active"] == 1
    assert not job["status"].get("conditions")
    pod = (await pods_of_job(kube))[0]
    with pytest.raises(ApiException) as err:
        await client.CoreV1Api(kube).read_namespaced_pod_log(pod["metadata"]["name"], NS, container="migrate")
    assert err.value.status == 400


async def pods_of_job(api: client.ApiClient) -> list[dict[str, Any]]:
    pods = await client.CoreV1Api(api).list_namespaced_pod(
        NS, label_selector="job-name=funnelcake-db-migrate"
    )
    return [plain(api, p) for p in pods.items]


# ------------------------------------------------------------------------------ three environments


async def test_three_isolated_clusters_behind_the_exec_plugin(
    sim_clusters: SimClusters, tmp_path: Path, registries: Registries, sim_gitops: GitOpsRemote
) -> None:
    path = sim_clusters.write_kubeconfig(tmp_path / "kubeconfig")
    seen = {}
    for env, context in sim_clusters.contexts.items():
        cfg = client.Configuration()
        await config.load_kube_config(config_file=str(path), context=context, client_configuration=cfg)
        async with client.ApiClient(cfg) as api:
            dep = await client.AppsV1Api(api).read_namespaced_deployment("funnelcake-api", NS)
            seen[env] = dep.spec.template.spec.containers[0].image
            app = await client.CustomObjectsApi(api).get_namespaced_custom_object(*ARGO, "funnelcake-api")
            assert app["status"]["health"]["status"] == "Healthy"
    assert seen == {env: f"{registries.prefix(env)}/funnelcake-api:{sim_gitops.tags[env]}" for env in seen}
    assert sim_clusters["production"].migrations_mode == "cloud"
    assert sim_clusters["staging"].clickhouse is not sim_clusters["poc"].clickhouse

    # an image that exists only in production's registry cannot be pulled by staging's nodes
    staging = sim_clusters["staging"]
    result = await staging.kubelet.pull(
        f"{registries.prefix('production')}/funnelcake-api:{sim_gitops.tags['production']}"
    )
    assert not result.ok
    assert result.detail.endswith("403 Forbidden")
    for cluster in sim_clusters.clusters.values():
        assert cluster.errors == []


async def test_missing_secret_is_create_container_config_error_until_it_exists(
    sim_cluster: SimCluster, kube: client.ApiClient, sim_gitops: GitOpsRemote
) -> None:
    core = client.CoreV1Api(kube)
    secret = await core.read_namespaced_secret("funnelcake-clickhouse-credentials", NS)
    await core.delete_namespaced_secret("funnelcake-clickhouse-credentials", NS)
    await client.BatchV1Api(kube).create_namespaced_job(
        NS, migrate_job(sim_cluster, sim_gitops.tags["staging"], ["up"])
    )

    async def config_error() -> dict[str, Any] | None:
        pods = await pods_of_job(kube)
        return (
            pods[0] if pods and waiting_reason(pods[0], "migrate") == "CreateContainerConfigError" else None
        )

    pod = await eventually(config_error, what="CreateContainerConfigError")
    (status,) = pod["status"]["containerStatuses"]
    assert status["state"]["waiting"]["message"] == 'secret "funnelcake-clickhouse-credentials" not found'

    await core.create_namespaced_secret(
        NS, {"metadata": {"name": "funnelcake-clickhouse-credentials"}, "data": secret.data}
    )

    async def complete() -> bool:
        job = plain(kube, await client.BatchV1Api(kube).read_namespaced_job("funnelcake-db-migrate", NS))
        return job["status"].get("succeeded") == 1

    await eventually(complete, what="job completes once the secret exists")
    logs = await core.read_namespaced_pod_log(pod["metadata"]["name"], NS, container="migrate")
    assert logs == "no change\n"
