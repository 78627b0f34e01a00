"""In-cluster image builds: the kaniko Job spec (pure), Builder.build on a simulated cluster, and a deploy that builds."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bot.adapters.build import CLONE_SCRIPT, Builder, build_job, recipe
from bot.adapters.kube import KubeClients
from bot.adapters.registry import RegistryClient
from bot.errors import PermanentError
from bot.ledger.models import DeployKind, DeployState
from bot.models import AMD64
from bot.service import DeployService
from bot.settings import MIGRATE_IMAGE, Environment, load_config
from tests.testbed.events import Events
from tests.testbed.gitrepos import AppRemote, push_from_second_clone
from tests.testbed.kube.cluster import SimCluster
from tests.testbed.kube.jobs import dockerfile_stages
from tests.testbed.registry import Registries
from tests.testbed.sandbox import Sandbox

CONFIG = load_config(Path(__file__).resolve().parent.parent / "config" / "funnelcake.yaml")
SHA = "e7e79eb3c1d2a4f5b6c7d8e9f0a1b2c3d4e5f6a7"
SHORT = SHA[:7]
IMAGES = ("funnelcake-api", "funnelcake-relay", MIGRATE_IMAGE)


def kaniko(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["kaniko"]
    return dict(containers[0])


def leaves(obj: Any, path: str = "") -> list[tuple[str, str]]:
    """Every string in a JSON document with where it sits."""
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in leaves(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [leaf for i, v in enumerate(obj) for leaf in leaves(v, f"{path}[{i}]")]
    return [(path, obj)] if isinstance(obj, str) else []


# ------------------------------------------------------------------------------------------- the Job spec


@pytest.mark.parametrize("env_name", ["production", "staging", "poc"])
@pytest.mark.parametrize("image", IMAGES)
def test_build_job_is_made_of_config_and_the_commit(env_name: str, image: str) -> None:
    env = CONFIG.env(env_name)
    url = CONFIG.repos.app.url
    job = build_job(env, image, SHA, SHORT, repo_url=url, service_account="funnelcake-builder")
    assert job == build_job(env, image, SHA, SHORT, repo_url=url, service_account="funnelcake-builder")
    assert job["metadata"]["namespace"] == env.namespace
    assert job["metadata"]["labels"]["app.kubernetes.io/name"] == "funnelcake-build"
    assert job["metadata"]["name"] == f"funnelcake-build-{image.removeprefix('funnelcake-')}-{SHORT}"
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "funnelcake-builder"
    args = kaniko(job)["args"]
    assert "--custom-platform=linux/amd64" in args
    # the env's own registry, nowhere else: each env's builder may only push there
    assert [a for a in args if a.startswith("--destination=")] == [
        f"--destination={env.registry}/{image}:{SHORT}"
    ]
    if image == MIGRATE_IMAGE:
        assert "--context=dir:///workspace/database" in args
        assert "--dockerfile=/workspace/database/Dockerfile" in args
        assert not [a for a in args if a.startswith("--target")]
    else:
        assert "--context=dir:///workspace" in args
        assert "--dockerfile=/workspace/Dockerfile" in args
        assert f"--target={image.removeprefix('funnelcake-')}" in args
    # the clone runs a fixed script; the URL and commit reach it only as environment values
    (init,) = pod["initContainers"]
    assert init["command"] == ["sh", "-c", CLONE_SCRIPT]
    assert {e["name"]: e["value"] for e in init["env"]} == {"REPO_URL": url, "COMMIT": SHA}
    where_sha = sorted(p for p, v in leaves(job) if SHA in v)
    assert where_sha == [
        ".spec.template.spec.containers[0].args[5]",
        ".spec.template.spec.initContainers[0].env[1].value",
    ]
    assert kaniko(job)["args"][5] == f"--label=org.opencontainers.image.revision={SHA}"
    assert all("\n" not in v and "`" not in v for _, v in leaves(job))


def test_no_recipe_for_an_unknown_image() -> None:
    with pytest.raises(PermanentError, match="no build recipe"):
        recipe("funnelcake-worker")
    assert recipe("funnelcake-relay").target == "relay"


def test_the_simulated_builder_reads_dockerfile_stages() -> None:
    text = (
        "# syntax=docker/dockerfile:1.7\nFROM --platform=$BUILDPLATFORM golang:1.23 AS build\nRUN go build\n\n"
        "FROM scratch AS api\nCOPY --from=build /out /\nFROM build\n"
    )
    stages = dockerfile_stages(text)
    assert [(s.base, s.name, s.instructions) for s in stages] == [
        ("golang:1.23", "build", ("RUN go build",)),
        ("scratch", "api", ("COPY --from=build /out /",)),
        ("build", None, ()),
    ]


# -------------------------------------------------------------------------------- on a simulated cluster


class Progress:
    def __init__(self) -> None:
        self.messages: list[str] = []

    async def __call__(self, message: str, data: Mapping[str, Any]) -> None:
        self.messages.append(message)


def job_log(cluster: SimCluster, job: str) -> str:
    pods = [
        p["metadata"]["name"]
        for p in cluster.store.list("pods", "funnelcake", label_selector=f"job-name={job}")[0]
    ]
    assert pods, f"no pod for Job {job}"
    return "\n".join(cluster.store.get_log("funnelcake", p, "kaniko") for p in pods)


async def test_builder_pushes_amd64_images_to_the_env_registry(
    sim_cluster: SimCluster, staging_clients: KubeClients, staging: Environment, app_remote: AppRemote
) -> None:
    sha = app_remote.commits["head"]  # deployed nowhere: in no registry
    short = sha[:7]
    builder = Builder(staging_clients, repo_url=app_remote.url, limit=30)
    progress = Progress()
    async with RegistryClient(attempts=1) as rc:
        for image in ("funnelcake-api", MIGRATE_IMAGE):
            assert not (await rc.check(staging.registry, image, short, AMD64)).ok
        await asyncio.gather(
            *(builder.build(staging, i, sha, short, progress) for i in ("funnelcake-api", MIGRATE_IMAGE))
        )
        statuses = {
            i: await rc.check(staging.registry, i, short, AMD64) for i in ("funnelcake-api", MIGRATE_IMAGE)
        }
    for image, status in statuses.items():
        assert status.ok, status
        assert status.platforms == ("linux/amd64",)
        job = f"funnelcake-build-{image.removeprefix('funnelcake-')}-{short}"
        mine = [m for m in progress.messages if m.startswith(f"staging/{image}:{short} build ")]
        # reported once per state, in order: a finished Job (no active pod) is not "starting" again
        assert mine[-1] == f"staging/{image}:{short} build running (Job {job})", mine
        assert mine in ([mine[-1]], [mine[-1].replace("running", "starting"), mine[-1]]), mine
        log = job_log(sim_cluster, job)
        dest = f"{staging.registry}/{image}:{short}"
        assert re.search(rf"^INFO\[\d{{4}}\] Pushing image to {re.escape(dest)}$", log, re.M), log
        assert f"Pushed {staging.registry}/{image}@{status.digest}" in log
    api_log = job_log(sim_cluster, f"funnelcake-build-api-{short}")
    # --target=api builds the api stage and what it copies from, never the relay's
    assert "Building stage 'gcr.io/distroless/static-debian12:nonroot'" in api_log
    assert "distroless/cc-debian12" not in api_log
    assert "Retrieving image manifest migrate/migrate:v4.18.1" in job_log(
        sim_cluster, f"funnelcake-build-migrate-{short}"
    )
    built = sim_cluster.controller.jobs.builds.built
    assert sorted((b.destination, b.commit, b.platform) for b in built) == sorted(
        (f"{staging.registry}/{i}:{short}", sha, "linux/amd64") for i in ("funnelcake-api", MIGRATE_IMAGE)
    )
    # the same commit built again replaces the finished Job and gives the same image
    await builder.build(staging, "funnelcake-api", sha, short, progress)
    async with RegistryClient(attempts=1) as rc:
        again = await rc.check(staging.registry, "funnelcake-api", short, AMD64)
    assert again.digest == statuses["funnelcake-api"].digest
    assert sim_cluster.errors == []


async def test_failing_builds_report_the_tail_of_the_job_log(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    staging: Environment,
    app_remote: AppRemote,
    registries: Registries,
) -> None:
    builder = Builder(staging_clients, repo_url=app_remote.url, limit=30)
    progress = Progress()
    unknown = "deadbeef" * 5

    def drop_relay_stage(text: str) -> str:
        return text.split("FROM gcr.io/distroless/cc-debian12:nonroot AS relay", maxsplit=1)[0]

    no_relay = await asyncio.to_thread(
        push_from_second_clone, app_remote.url, "Dockerfile", drop_relay_stage, "build: api only\n"
    )
    head = app_remote.commits["head"]
    # an env whose registry is production's, built on staging's cluster: its builder may not push there
    elsewhere = staging.model_copy(update={"registry": registries.prefix("production")})
    results = await asyncio.gather(
        builder.build(staging, "funnelcake-api", unknown, unknown[:7], progress),
        builder.build(staging, "funnelcake-relay", no_relay, no_relay[:7], progress),
        builder.build(elsewhere, "funnelcake-api", head, head[:7], progress),
        return_exceptions=True,
    )
    for r in results:
        assert isinstance(r, PermanentError), r
    clone, target, denied = results
    assert isinstance(clone, PermanentError)
    assert isinstance(target, PermanentError)
    assert isinstance(denied, PermanentError)
    # the clone init container failed (Init:Error): kaniko never starts, the bot says so at once
    assert clone.message == (
        "the build Job funnelcake-build-api-deadbee's init container clone failed "
        "(exit code 128, Error), so it never started"
    )
    assert f"fatal: reference is not a tree: {unknown}" in (clone.hint or "")
    assert 'target stage "relay" could not be found' in (target.hint or "")
    assert "error building image" in (target.hint or "")
    assert "DENIED" in (denied.hint or "") and registries.prefix("production") in (denied.hint or "")
    # the tail only, not the whole log
    assert all(len((e.hint or "").splitlines()) <= 16 for e in (clone, target, denied))
    async with RegistryClient(attempts=1) as rc:
        assert not (await rc.check(registries.prefix("production"), "funnelcake-api", head[:7])).ok
        assert not (await rc.check(staging.registry, "funnelcake-relay", no_relay[:7])).ok
    assert sim_cluster.controller.jobs.builds.built == []
    # the name is free for the next build: the Job failed already, or the bot deleted it as stuck
    left = sim_cluster.store.get("jobs", "funnelcake", "funnelcake-build-api-deadbee")
    assert left is None or any(c["type"] == "Failed" for c in left["status"].get("conditions", []))
    assert sim_cluster.errors == []


# ----------------------------------------------------------------------------------- a deploy that builds


async def test_deploy_of_a_commit_in_no_registry_builds_it_in_poc(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    assert sandbox.git is not None
    assert sandbox.clusters is not None
    sha = sandbox.git.app.commits["head"]
    short = sha[:7]

    plan, result = await svc.plan(["poc"], short, "U0ALICE")
    assert plan is not None, result
    assert {(i.image, i.action) for i in plan.images()} == {(i, "build") for i in IMAGES}

    started = await svc.start(DeployKind.DEPLOY, ["poc"], short, "U0ALICE")
    record = await svc.wait(started.record.id)
    assert record.state is DeployState.SUCCEEDED, record.message

    progress = [e.message for e in events.events if e.step == "images" and e.kind.value == "progress"]
    for image in IMAGES:
        assert f"poc/{image}:{short} built for linux/amd64" in progress, progress
        job = f"funnelcake-build-{image.removeprefix('funnelcake-')}-{short}"
        assert f"poc/{image}:{short} build running (Job {job})" in progress
        spec = sandbox.clusters["poc"].store.get("jobs", "funnelcake", job)
        assert spec is not None
        # the Job carries the resolved full sha, not what the user typed
        init_env = spec["spec"]["template"]["spec"]["initContainers"][0]["env"]
        assert {"name": "COMMIT", "value": sha} in init_env
        assert "U0ALICE" not in json.dumps(spec)
    async with RegistryClient(attempts=1) as rc:
        for image in IMAGES:
            assert (await rc.check(sandbox.registries.prefix("poc"), image, short, AMD64)).ok
            # each env's registry is isolated: building for poc put nothing anywhere else
            for other in ("production", "staging"):
                assert (await rc.check(sandbox.registries.prefix(other), image, short)).state == "missing"
    relay = sandbox.clusters["poc"].store.get("deployments", "funnelcake", "funnelcake-relay")
    assert relay is not None
    assert relay["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f"/funnelcake-relay:{short}")
    assert relay["status"]["readyReplicas"] == relay["spec"]["replicas"]


async def test_rebuild_builds_from_source_even_when_the_registry_has_the_tag(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    """The Rebuild button: an image whose manifest says amd64 but whose binaries are not gets rebuilt."""
    svc, _ = service
    assert sandbox.git is not None
    assert sandbox.clusters is not None
    short = sandbox.git.app.commits["head"][:7]
    pushed = {
        image: await sandbox.registries.push("poc", image, short, "amd64", seed=f"mac-{image}")
        for image in IMAGES
    }

    started = await svc.start(DeployKind.DEPLOY, ["poc"], short, "U0ALICE", rebuild=True)
    record = await svc.wait(started.record.id)
    assert record.state is DeployState.SUCCEEDED, record.message
    assert record.plan is not None
    assert record.plan["rebuild"] is True
    assert {(i["image"], i["action"]) for ep in record.plan["env_plans"].values() for i in ep["images"]} == {
        (i, "build") for i in IMAGES
    }
    async with RegistryClient(attempts=1) as rc:
        for image in IMAGES:
            status = await rc.check(sandbox.registries.prefix("poc"), image, short, AMD64)
            assert status.ok
            assert status.digest != pushed[image]  # the registry now holds the fresh build
