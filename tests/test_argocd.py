"""Argo CD refresh + sync against a simulated cluster: consumed refresh, the previous operationState (also one
from the same second as the request), a running operation, a failed sync, a sync of several apps; plus the pure
rules that tell a consumed refresh and our own operation."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from bot.adapters.argocd import ArgoCD, ours, refresh_consumed
from bot.adapters.kube import KubeClients
from bot.errors import PermanentError
from bot.settings import Environment
from tests.testbed.clusterops import bump_overlay
from tests.testbed.gitrepos import AppRemote, GitOpsRemote
from tests.testbed.kube.cluster import SimCluster, Timings
from tests.testbed.kube.controller import now_rfc3339
from tests.testbed.registry import Registries

# ---------------------------------------------------------------------------------------------- pure rules


def t(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def app_obj(reconciled: str | None, annotated: bool) -> dict:
    meta: dict = {"name": "a"}
    if annotated:
        meta["annotations"] = {"argocd.argoproj.io/refresh": "hard"}
    return {"metadata": meta, "status": {"reconciledAt": reconciled} if reconciled else {}}


def test_refresh_consumed_rules() -> None:
    before = t("2026-01-01T10:00:00Z")
    assert not refresh_consumed(app_obj("2026-01-01T10:05:01Z", True), before)  # annotation still there
    assert not refresh_consumed(app_obj(None, False), before)  # never reconciled
    assert refresh_consumed(app_obj("2026-01-01T10:05:01Z", False), before)
    assert refresh_consumed(app_obj("2026-01-01T10:05:01Z", False), None)
    # reconciled in the same second as the one before (one-second resolution), or by a controller whose clock
    # is behind the bot's: the annotation's absence after our patch is what counts, not any clock
    same = t("2026-01-01T10:05:00Z")
    assert refresh_consumed(app_obj("2026-01-01T10:05:00Z", False), same)


def test_ours_is_the_requested_operation_not_the_one_shown_before() -> None:
    before = {
        "startedAt": "2026-01-01T10:05:00Z",  # same second as our request: the clock cannot tell
        "phase": "Succeeded",
        "operation": {"initiatedBy": {"username": "platform-team"}, "sync": {"syncStrategy": {"hook": {}}}},
    }
    mine = {
        "startedAt": "2026-01-01T10:05:00Z",
        "phase": "Running",
        "operation": {"initiatedBy": {"username": "U1"}, "sync": {"revision": "b"}},
    }
    assert not ours(before, before, "b", "U1")  # what was there before we asked
    assert not ours({}, before, "b", "U1")
    assert ours(mine, before, "b", "U1")
    assert ours(mine, {}, "b", "U1")  # an app never synced before
    assert not ours(mine, mine, "b", "U1")  # our own earlier sync of that revision is not the new one
    assert not ours(mine, before, "c", "U1")  # someone else's revision
    assert not ours(mine, before, "b", "U2")  # someone else's sync of it
    unnamed = {**mine, "operation": {"initiatedBy": {"username": "U1"}, "sync": {}}}
    assert not ours(unnamed, before, "b", "U1")  # a sync that named no revision is not one we requested


# ------------------------------------------------------------------------------------ against the cluster


async def test_refresh_is_consumed_and_reports_out_of_sync(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    sim_gitops: GitOpsRemote,
    app_remote: AppRemote,
) -> None:
    argo = ArgoCD(staging_clients[staging.kube_context], "argocd", env_name="staging", refresh_limit=10)
    before = await argo.get("funnelcake-api")
    sha = await asyncio.to_thread(bump_overlay, sim_gitops, "staging", "api", app_remote.short("head"))
    app = await argo.refresh("funnelcake-api")
    assert "argocd.argoproj.io/refresh" not in (app["metadata"].get("annotations") or {})
    assert t(app["status"]["reconciledAt"]) > t(before["status"]["reconciledAt"])
    assert app["status"]["sync"]["status"] == "OutOfSync"
    assert app["status"]["sync"]["revision"] == sha


@pytest.fixture
async def api_head(
    sim_cluster: SimCluster, registries: Registries, sim_gitops: GitOpsRemote, app_remote: AppRemote
) -> tuple[str, str]:
    """The api's head image in the staging registry and the GitOps commit deploying it: (tag, commit).
    Pushed after the cluster was seeded (synced at the previous head)."""
    tag = app_remote.short("head")
    await registries.push("staging", "funnelcake-api", tag, "amd64", seed="api-head")
    return tag, await asyncio.to_thread(bump_overlay, sim_gitops, "staging", "api", tag)


def live_api_image(cluster: SimCluster) -> str:
    dep = cluster.store.get("deployments", "funnelcake", "funnelcake-api")
    return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])


async def test_sync_to_the_pushed_revision(
    sim_cluster: SimCluster, staging_clients: KubeClients, staging: Environment, api_head: tuple[str, str]
) -> None:
    tag, sha = api_head
    argo = ArgoCD(staging_clients[staging.kube_context], "argocd", env_name="staging", sync_limit=20)
    # the seed left a finished operationState behind: the result must be the new one, not that one
    previous = (await argo.get("funnelcake-api"))["status"]["operationState"]
    assert previous["syncResult"]["revision"] != sha
    res = await argo.sync("funnelcake-api", sha, username="U123ALICE")
    assert res.phase == "Succeeded"
    assert res.revision == sha
    assert res.started_at >= previous["startedAt"]
    # applied, not yet rolled out: Argo reports Progressing until the pods are Ready (the rollout step's job)
    assert res.sync_status == "Synced"
    assert res.health in {"Progressing", "Healthy"}
    live = sim_cluster.store.get("applications", "argocd", "funnelcake-api")
    assert live["status"]["operationState"]["operation"]["initiatedBy"]["username"] == "U123ALICE"
    assert live_api_image(sim_cluster) == f"{staging.registry}/funnelcake-api:{tag}"
    assert not sim_cluster.errors


@pytest.mark.parametrize("sim_timings", [Timings(argo_reconcile=0.4)])
async def test_previous_operation_state_is_visible_right_after_the_patch(
    sim_cluster: SimCluster, staging_clients: KubeClients, staging: Environment, api_head: tuple[str, str]
) -> None:
    """A slow controller: the old operationState is what the watch shows first; the sync must not take it."""
    sha = api_head[1]
    client = staging_clients[staging.kube_context]
    argo = ArgoCD(client, "argocd", env_name="staging", sync_limit=20)
    await argo.refresh("funnelcake-api")
    old = (await argo.get("funnelcake-api"))["status"]["operationState"]
    assert old["phase"] == "Succeeded"  # a finished operation, on another revision
    task = asyncio.create_task(argo.sync("funnelcake-api", sha, username="U1", refresh=False))
    await asyncio.sleep(0.15)
    mid = sim_cluster.store.get("applications", "argocd", "funnelcake-api")
    assert mid["status"]["operationState"]["startedAt"] == old["startedAt"]  # still the previous one
    assert mid["operation"]["sync"]["revision"] == sha
    assert not task.done()
    res = await task
    assert res.revision == sha


@pytest.mark.parametrize("sim_timings", [Timings(argo_reconcile=0.4)])
async def test_a_sync_finished_in_the_same_second_as_the_request_is_not_taken_for_ours(
    sim_cluster: SimCluster, staging_clients: KubeClients, staging: Environment, api_head: tuple[str, str]
) -> None:
    """The platform team's sync (no revision named) finished within the second of our request: its startedAt,
    at one-second resolution, is not before the request, yet the result must be the sync we asked for."""
    tag, sha = api_head
    argo = ArgoCD(staging_clients[staging.kube_context], "argocd", env_name="staging", sync_limit=20)
    await argo.refresh("funnelcake-api")
    # at the start of a wall-clock second, so that our request falls in the same second
    now = dt.datetime.now(dt.UTC)
    await asyncio.sleep(1.02 - now.microsecond / 1e6)
    second = now_rfc3339()

    def just_synced(app: dict) -> None:
        state = app["status"]["operationState"]
        assert state["syncResult"]["revision"] != sha
        assert "revision" not in state["operation"]["sync"]
        app["status"]["operationState"] = {**state, "startedAt": second, "finishedAt": second}

    sim_cluster.store.update("applications", "argocd", "funnelcake-api", just_synced)
    res = await argo.sync("funnelcake-api", sha, username="U1", refresh=False)
    assert (res.phase, res.revision) == ("Succeeded", sha)
    live = sim_cluster.store.get("applications", "argocd", "funnelcake-api")
    assert live["status"]["operationState"]["operation"]["initiatedBy"]["username"] == "U1"
    assert live_api_image(sim_cluster) == f"{staging.registry}/funnelcake-api:{tag}"


async def test_sync_refused_while_an_operation_is_running(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
) -> None:
    def running(app: dict) -> None:
        app["status"]["operationState"] = {
            "phase": "Running",
            "startedAt": "2026-01-01T00:00:00Z",
            "operation": {"initiatedBy": {"username": "U999BOB"}, "sync": {"revision": "abc"}},
        }

    sim_cluster.store.update("applications", "argocd", "funnelcake-api", running)
    argo = ArgoCD(staging_clients[staging.kube_context], "argocd", env_name="staging")
    with pytest.raises(PermanentError, match="already running an operation") as err:
        await argo.sync("funnelcake-api", "0" * 40, username="U1", refresh=False)
    assert "U999BOB" in str(err.value)
    assert "operation" not in sim_cluster.store.get("applications", "argocd", "funnelcake-api")


async def test_sync_to_an_unknown_revision_fails_with_the_controller_message(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
) -> None:
    argo = ArgoCD(staging_clients[staging.kube_context], "argocd", env_name="staging", sync_limit=20)
    with pytest.raises(PermanentError, match=r"Argo CD sync of funnelcake-api in staging error: ") as err:
        await argo.sync("funnelcake-api", "f" * 40, username="U1")
    # Argo CD fails the operation (revision not found): the bot reports the controller's message
    assert f"ComparisonError: unable to resolve '{'f' * 40}' to a commit SHA" in str(err.value)


async def test_sync_all_syncs_both_apps_concurrently(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    sim_gitops: GitOpsRemote,
    app_remote: AppRemote,
    registries: Registries,
) -> None:
    tag = app_remote.short("head")
    await asyncio.gather(
        registries.push("staging", "funnelcake-api", tag, "amd64", seed="api-head"),
        registries.push("staging", "funnelcake-relay", tag, "amd64", seed="relay-head"),
    )
    await asyncio.to_thread(bump_overlay, sim_gitops, "staging", "api", tag)
    sha = await asyncio.to_thread(bump_overlay, sim_gitops, "staging", "relay", tag)
    argo = ArgoCD(staging_clients[staging.kube_context], "argocd", env_name="staging", sync_limit=20)
    results = await argo.sync_all(["funnelcake-api", "funnelcake-relay"], sha, username="U1")
    assert [(r.app, r.revision, r.phase) for r in results] == [
        ("funnelcake-api", sha, "Succeeded"),
        ("funnelcake-relay", sha, "Succeeded"),
    ]


async def test_missing_application_is_a_clear_error(
    staging_clients: KubeClients, staging: Environment
) -> None:
    argo = ArgoCD(staging_clients[staging.kube_context], "argocd", env_name="staging")
    with pytest.raises(PermanentError, match="funnelcake-nope does not exist in staging"):
        await argo.get("funnelcake-nope")
