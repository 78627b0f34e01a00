"""Rollout: the kubectl rollout-status decision per branch (pure) and the watch with fail-fast on a simulated cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.adapters.diagnosis import Cause, Diagnoser
from bot.adapters.kube import KubeClients
from bot.adapters.registry import RegistryClient
from bot.adapters.rollout import (
    RolloutFailed,
    RolloutPhase,
    RolloutProgress,
    is_new_pod,
    rollout_status,
    watch_rollout,
    watch_rollouts,
)
from bot.settings import Environment, FunnelcakeConfig
from tests.testbed.gitrepos import AppRemote
from tests.testbed.kube.cluster import SimCluster
from tests.testbed.registry import Registries


def deploy(
    *,
    generation: int = 2,
    observed: int = 2,
    replicas: int = 2,
    status_replicas: int = 2,
    updated: int = 2,
    available: int = 2,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": "funnelcake-api", "generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": status_replicas,
            "updatedReplicas": updated,
            "availableReplicas": available,
            "conditions": conditions or [],
        },
    }


def test_spec_update_not_observed_is_waiting() -> None:
    st = rollout_status(deploy(generation=3, observed=2))
    assert st.phase is RolloutPhase.WAITING
    assert st.message == "Waiting for deployment spec update to be observed..."


def test_progress_deadline_exceeded_is_failed_even_if_counts_look_done() -> None:
    cond = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    st = rollout_status(deploy(conditions=cond))
    assert st.phase is RolloutPhase.FAILED
    assert "exceeded its progress deadline" in st.message


def test_deadline_checked_only_after_generation_observed() -> None:
    cond = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    assert rollout_status(deploy(generation=4, observed=3, conditions=cond)).phase is RolloutPhase.WAITING


def test_updated_below_replicas_is_waiting() -> None:
    st = rollout_status(deploy(updated=1, status_replicas=3, available=2))
    assert st.phase is RolloutPhase.WAITING
    assert "1 out of 2 new replicas have been updated" in st.message


def test_old_replicas_pending_termination_is_waiting() -> None:
    st = rollout_status(deploy(status_replicas=3, updated=2, available=2))
    assert st.phase is RolloutPhase.WAITING
    assert "1 old replicas are pending termination" in st.message


def test_available_below_updated_is_waiting() -> None:
    st = rollout_status(deploy(available=1))
    assert st.phase is RolloutPhase.WAITING
    assert "1 of 2 updated replicas are available" in st.message


def test_done() -> None:
    st = rollout_status(deploy())
    assert st.phase is RolloutPhase.DONE
    assert (st.available, st.total) == (2, 2)
    assert st.message == 'deployment "funnelcake-api" successfully rolled out'


def test_progressing_reasons_other_than_deadline_do_not_fail() -> None:
    cond = [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]
    assert rollout_status(deploy(available=0, conditions=cond)).phase is RolloutPhase.WAITING


def test_new_pod_matches_template_images() -> None:
    d = {"spec": {"template": {"spec": {"containers": [{"name": "api", "image": "r/funnelcake-api:new"}]}}}}
    new = {"spec": {"containers": [{"name": "api", "image": "r/funnelcake-api:new"}]}}
    old = {"spec": {"containers": [{"name": "api", "image": "r/funnelcake-api:old"}]}}
    assert is_new_pod(new, d)
    assert not is_new_pod(old, d)


# ------------------------------------------------------------------------------ on the simulated cluster

NS = "funnelcake"


def set_image(cluster: SimCluster, service: str, image: str) -> None:
    """Change the Deployment's image as an Argo CD sync would (a spec change: new generation, new pods)."""

    def edit(dep: dict) -> None:
        dep["spec"]["template"]["spec"]["containers"][0]["image"] = image

    cluster.store.update("deployments", NS, f"funnelcake-{service}", edit)


@pytest.fixture
async def diagnoser(cfg: FunnelcakeConfig) -> AsyncIterator[Diagnoser]:
    async with RegistryClient(attempts=1) as rc:
        yield Diagnoser(cfg.env("staging"), cfg.environments, check=rc.check)


async def test_rollout_to_a_present_image_reports_progress_and_finishes(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    cfg: FunnelcakeConfig,
    diagnoser: Diagnoser,
    registries: Registries,
    app_remote: AppRemote,
) -> None:
    env: Environment = cfg.env("staging")
    tag = app_remote.short("head")
    await registries.push("staging", "funnelcake-api", tag, "amd64", seed="api-head")
    set_image(sim_cluster, "api", env.image_ref("funnelcake-api", tag))
    seen: list[RolloutProgress] = []

    async def progress(p: RolloutProgress) -> None:
        seen.append(p)

    res = await watch_rollout(
        staging_clients[env.kube_context],
        NS,
        "funnelcake-api",
        diagnoser=diagnoser,
        give_up_after=20,
        progress=progress,
    )
    assert (res.ready, res.total) == (2, 2)
    assert res.images == {"api": env.image_ref("funnelcake-api", tag)}
    assert len(res.pods) == 2
    assert seen[-1].ready == seen[-1].total == 2
    assert any(p.ready < 2 for p in seen)  # it reported the way up, not only the end
    assert not sim_cluster.errors


async def test_missing_tag_fails_fast_with_a_promote_diagnosis(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    cfg: FunnelcakeConfig,
    diagnoser: Diagnoser,
    registries: Registries,
    app_remote: AppRemote,
) -> None:
    env = cfg.env("staging")
    tag = app_remote.short("head")
    await registries.push("production", "funnelcake-api", tag, "amd64", seed="api-head")  # only in production
    set_image(sim_cluster, "api", env.image_ref("funnelcake-api", tag))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RolloutFailed) as err:
        # the overall limit is far away: only fail-fast can end this quickly
        await watch_rollout(
            staging_clients[env.kube_context], NS, "funnelcake-api", diagnoser=diagnoser, give_up_after=60
        )
    assert loop.time() - started < 5
    d = err.value.diagnosis
    assert d is not None
    assert d.kind is Cause.TAG_MISSING
    assert d.promote_from == ("production",)
    assert "not found" in d.evidence
    assert d.evidence.startswith("Failed to pull image")
    assert "Promote" in d.fix
    assert "funnelcake-api" in str(err.value)


async def test_without_fail_fast_the_overall_limit_ends_it_with_a_diagnosis(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    cfg: FunnelcakeConfig,
    diagnoser: Diagnoser,
) -> None:
    env = cfg.env("staging")
    set_image(sim_cluster, "api", env.image_ref("funnelcake-api", "0000000"))
    with pytest.raises(RolloutFailed, match="did not finish within 1s") as err:
        await watch_rollout(
            staging_clients[env.kube_context],
            NS,
            "funnelcake-api",
            diagnoser=diagnoser,
            give_up_after=1,
            fail_fast=False,
        )
    assert err.value.diagnosis is not None
    assert err.value.diagnosis.kind is Cause.TAG_MISSING
    assert err.value.diagnosis.promote_from == ()


async def test_watch_rollouts_raises_the_failure_not_a_group(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    cfg: FunnelcakeConfig,
    diagnoser: Diagnoser,
) -> None:
    env = cfg.env("staging")
    set_image(sim_cluster, "relay", env.image_ref("funnelcake-relay", "0000000"))
    with pytest.raises(RolloutFailed) as err:
        await watch_rollouts(
            staging_clients[env.kube_context],
            NS,
            ["funnelcake-api", "funnelcake-relay"],
            diagnoser=diagnoser,
            give_up_after=30,
        )
    assert err.value.deployment == "funnelcake-relay"
