"""Build and migration Jobs meet what GKE does that a happy path never shows: admission refusing the pod,
a pod no node can take, the previous run's pods still Terminating. The bot says why at once, with the fix,
instead of waiting out the Job's timeout; and it reads only its own run's log."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from bot.adapters.build import Builder
from bot.adapters.diagnosis import Diagnoser
from bot.adapters.kube import KubeClients
from bot.adapters.migrations import MigrateOutcome, MigrationFailed, MigrationRunner
from bot.adapters.snapshot import snapshot_env
from bot.errors import PermanentError
from bot.settings import MIGRATE_IMAGE, Environment
from tests.testbed.gitrepos import AppRemote
from tests.testbed.kube.cluster import SimCluster, Timings
from tests.testbed.registry import Registries

NS = "funnelcake"
# Builds and migrations may take this long on GKE; a stuck Job must be reported long before.
LONG = 1800.0


@pytest.fixture
def sim_timings() -> Timings:
    # deleted pods stay Terminating for a while, as pods stopping on GKE do
    return dataclasses.replace(Timings.fast(), termination=30.0)


async def _progress(message: str, data: object) -> None:
    return None


async def test_build_whose_service_account_is_missing_fails_at_once_with_the_fix(
    sim_cluster: SimCluster, staging_clients: KubeClients, staging: Environment, app_remote: AppRemote
) -> None:
    sha = app_remote.commits["head"]
    builder = Builder(
        staging_clients, repo_url=app_remote.url, service_account="funnelcake-kaniko", limit=LONG
    )
    async with asyncio.timeout(10):  # far below the build timeout: the cause is reported, not waited out
        with pytest.raises(PermanentError) as err:
            await builder.build(staging, "funnelcake-api", sha, sha[:7], _progress)
    message = str(err.value)
    assert "cannot create its pod" in message
    assert 'serviceaccount "funnelcake-kaniko" not found' in message
    assert "Create the service account funnelcake-kaniko in namespace funnelcake" in (err.value.hint or "")
    # GKE's own record of it: FailedCreate on the Job and no pod at all; the bot deleted the stuck Job
    name = f"funnelcake-build-api-{sha[:7]}"
    events, _ = sim_cluster.store.list("events", NS, field_selector=f"involvedObject.name={name}")
    assert {e["reason"] for e in events} == {"FailedCreate"}
    assert sim_cluster.store.list("pods", NS, label_selector=f"job-name={name}")[0] == []
    assert sim_cluster.store.get("jobs", NS, name) is None


async def test_build_no_node_can_take_is_reported_with_the_schedulers_reason(
    sim_cluster: SimCluster, staging_clients: KubeClients, staging: Environment, app_remote: AppRemote
) -> None:
    # the cluster's only pool is arm64 (Tau T2A); the build pins linux/amd64
    for node in sim_cluster.store.list("nodes")[0]:

        def arm(obj: dict[str, object]) -> None:
            obj["metadata"]["labels"]["kubernetes.io/arch"] = "arm64"  # type: ignore[index]

        sim_cluster.store.update("nodes", "", node["metadata"]["name"], arm)
    sha = app_remote.commits["head"]
    builder = Builder(staging_clients, repo_url=app_remote.url, limit=LONG)
    async with asyncio.timeout(10):  # a bound on the wait: the scheduler names the cause, not the timeout
        with pytest.raises(PermanentError) as err:
            await builder.build(staging, MIGRATE_IMAGE, sha, sha[:7], _progress)
    message = str(err.value)
    assert "cannot be scheduled" in message
    assert "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector" in message
    assert "nodeSelector {'kubernetes.io/arch': 'amd64'}" in (err.value.hint or "")
    (pod,) = sim_cluster.store.list(
        "pods", NS, label_selector=f"job-name=funnelcake-build-migrate-{sha[:7]}"
    )[0]
    assert pod["status"]["phase"] == "Pending"
    assert "nodeName" not in pod["spec"]
    events, _ = sim_cluster.store.list(
        "events", NS, field_selector=f"involvedObject.name={pod['metadata']['name']}"
    )
    assert [e["reason"] for e in events] == ["FailedScheduling"]


async def test_migration_reads_only_its_own_log_while_the_previous_runs_pod_terminates(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    app_remote: AppRemote,
    registries: Registries,
) -> None:
    client = staging_clients[staging.kube_context]
    broken = app_remote.short("broken")  # adds 000004, which fails half-way: the database is left dirty
    await registries.push("staging", "funnelcake-migrate", broken, "amd64", seed=f"migrate-{broken}")
    runner = MigrationRunner(job_timeout=60)
    with pytest.raises(MigrationFailed) as err:
        await runner.up(client, staging, broken)
    assert err.value.run.result.outcome is MigrateOutcome.DIRTY
    first_pods = {
        p["metadata"]["name"]
        for p in sim_cluster.store.list("pods", NS, label_selector="job-name=funnelcake-db-migrate")[0]
    }

    # someone repairs the database by hand; the next run replaces the Job while the old pods still stop
    sim_cluster.clickhouse.dirty = False
    sim_cluster.clickhouse.version = 4
    run = await runner.up(client, staging, broken)
    listed = sim_cluster.store.list("pods", NS, label_selector="job-name=funnelcake-db-migrate")[0]
    terminating = [p for p in listed if p["metadata"].get("deletionTimestamp")]
    assert terminating and {p["metadata"]["name"] for p in terminating} <= first_pods  # GKE still lists them
    stale = [sim_cluster.store.get_log(NS, p["metadata"]["name"], "migrate") for p in terminating]
    assert all(text.startswith("error: ") for text in stale)  # what a careless reader would parse
    assert run.succeeded
    assert run.result.outcome is MigrateOutcome.NO_CHANGE
    assert "error" not in run.log
    assert run.pod not in first_pods


async def test_snapshot_counts_no_terminating_pod(
    sim_cluster: SimCluster, staging_clients: KubeClients, staging: Environment
) -> None:
    pods = sim_cluster.store.list("pods", NS, label_selector="app.kubernetes.io/name=funnelcake-relay")[0]
    victim = pods[0]["metadata"]["name"]
    # kubectl delete pod: it stays Terminating (still Ready) while its replacement comes up
    sim_cluster.store.delete("pods", NS, victim)

    async def replaced() -> bool:
        live = [
            p
            for p in sim_cluster.store.list(
                "pods", NS, label_selector="app.kubernetes.io/name=funnelcake-relay"
            )[0]
            if not p["metadata"].get("deletionTimestamp")
        ]
        return (
            len(live) == 2
            and all(
                c.get("status") == "True"
                for p in live
                for c in p["status"].get("conditions", [])
                if c["type"] == "Ready"
            )
            and all(p["status"].get("conditions") for p in live)
        )

    async with asyncio.timeout(20):
        while not await replaced():
            await asyncio.sleep(0.05)
    gone = sim_cluster.store.get("pods", NS, victim)
    assert gone is not None and gone["metadata"]["deletionTimestamp"]  # still listed, Terminating
    client = staging_clients[staging.kube_context]
    snap = await snapshot_env(client, staging, diagnoser=Diagnoser(staging))
    relay = next(s for s in snap.services if s.service == "relay")
    assert (relay.ready, relay.total) == (2, 2)
