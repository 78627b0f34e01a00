"""Diagnosis: classification of containerd pull messages (pure) and each cause on a simulated cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.adapters.diagnosis import (
    Cause,
    Diagnoser,
    Diagnosis,
    PullFailure,
    _pull_event,
    classify_pull_error,
    failing_reason,
    registry_reader_command,
    split_image,
)
from bot.adapters.kube import KubeClients
from bot.adapters.registry import RegistryClient
from bot.adapters.rollout import RolloutFailed, watch_rollout
from bot.settings import FunnelcakeConfig
from tests.test_rollout import NS, set_image
from tests.testbed.kube.cluster import SimCluster
from tests.testbed.registry import Registries

IMG = "us-central1-docker.pkg.dev/rich-compiler-479518-d2/containers-poc/funnelcake-api:e7e79eb"

# The kubelet event texts, as containerd words them.
NOT_FOUND = (
    f'Failed to pull image "{IMG}": rpc error: code = NotFound desc = failed to pull and unpack image '
    f'"{IMG}": failed to resolve reference "{IMG}": {IMG}: not found'
)
WRONG_ARCH = (
    f'Failed to pull image "{IMG}": rpc error: code = NotFound desc = failed to pull and unpack image '
    f'"{IMG}": no match for platform in manifest: not found'
)
UNAUTHORIZED = (
    f'Failed to pull image "{IMG}": rpc error: code = Unknown desc = failed to pull and unpack image '
    f'"{IMG}": failed to resolve reference "{IMG}": pulling from host us-central1-docker.pkg.dev failed '
    "with status code [manifests e7e79eb]: 401 Unauthorized"
)
FORBIDDEN = (
    f'Failed to pull image "{IMG}": rpc error: code = Unknown desc = failed to pull and unpack image '
    f'"{IMG}": failed to resolve reference "{IMG}": unexpected status from HEAD request to '
    "https://us-central1-docker.pkg.dev/v2/rich-compiler-479518-d2/containers-poc/funnelcake-api/manifests/e7e79eb: "
    "403 Forbidden"
)
# the kubelet's text (1.33: parsers.ParseImageName over distribution/reference)
INVALID = (
    'Failed to apply default image tag "Funnelcake:UPPER": couldn\'t parse image name "Funnelcake:UPPER": '
    "invalid reference format: repository name (library/Funnelcake) must be lowercase"
)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (NOT_FOUND, PullFailure.TAG_MISSING),
        (WRONG_ARCH, PullFailure.WRONG_PLATFORM),
        (UNAUTHORIZED, PullFailure.UNAUTHORIZED),
        (FORBIDDEN, PullFailure.FORBIDDEN),
        (INVALID, PullFailure.INVALID_NAME),
        ("Back-off pulling image", PullFailure.UNKNOWN),
    ],
)
def test_classify_pull_error(message: str, expected: PullFailure) -> None:
    assert classify_pull_error(message) is expected


def test_ports_and_tags_with_401_or_403_digits_do_not_read_as_auth_errors() -> None:
    img = "127.0.0.1:40301/dv-platform-prod/containers-production/funnelcake-api:4013abc"
    msg = f'Failed to pull image "{img}": rpc error: code = NotFound desc = "{img}": {img}: not found'
    assert classify_pull_error(msg) is PullFailure.TAG_MISSING


def test_split_image() -> None:
    assert split_image(IMG) == (
        "us-central1-docker.pkg.dev/rich-compiler-479518-d2/containers-poc",
        "funnelcake-api",
        "e7e79eb",
    )
    assert split_image("127.0.0.1:5000/a/b/img:abc") == ("127.0.0.1:5000/a/b", "img", "abc")
    assert split_image("127.0.0.1:5000/a/img") == ("127.0.0.1:5000/a", "img", "latest")
    assert split_image("h/a/img@sha256:00") == ("h/a", "img", "@sha256:00")


def test_registry_reader_command_names_repo_project_location_and_role() -> None:
    cmd = registry_reader_command(
        "us-central1-docker.pkg.dev/dv-platform-staging/containers-staging", "node@p.iam.gserviceaccount.com"
    )
    assert cmd == (
        "gcloud artifacts repositories add-iam-policy-binding containers-staging --project=dv-platform-staging "
        "--location=us-central1 --member=serviceAccount:node@p.iam.gserviceaccount.com "
        "--role=roles/artifactregistry.reader"
    )


def test_failing_reason_reads_waiting_containers_only() -> None:
    pod = {
        "status": {
            "containerStatuses": [
                {"name": "a", "state": {"running": {}}},
                {"name": "b", "state": {"waiting": {"reason": "ContainerCreating"}}},
                {"name": "c", "state": {"waiting": {"reason": "ImagePullBackOff"}}},
            ]
        }
    }
    reason, cs = failing_reason(pod) or ("", {})
    assert (reason, cs["name"]) == ("ImagePullBackOff", "c")
    assert failing_reason({"status": {"containerStatuses": [{"state": {"running": {}}}]}}) is None


def ev(
    reason: str, message: str, container: str = "api", when: str = "2026-01-05T09:00:00Z"
) -> dict[str, Any]:
    """A pod Event as the kubelet writes it (second-resolution timestamps: ties keep list order)."""
    return {
        "reason": reason,
        "message": message,
        "type": "Normal" if reason in ("Pulling", "BackOff") else "Warning",
        "involvedObject": {"kind": "Pod", "name": "p", "fieldPath": f"spec.containers{{{container}}}"},
        "lastTimestamp": when,
    }


def test_pull_event_prefers_the_detailed_message_over_newer_bare_errors() -> None:
    events = [
        ev("Pulling", f'Pulling image "{IMG}"'),
        ev("Failed", NOT_FOUND),
        ev("Failed", "Error: ErrImagePull"),
        ev("BackOff", f'Back-off pulling image "{IMG}"', when="2026-01-05T09:00:01Z"),
        ev("Failed", "Error: ImagePullBackOff", when="2026-01-05T09:00:01Z"),
    ]
    assert _pull_event(events, "api") == events[1]
    assert _pull_event(events) == events[1]
    # the newest detailed one when the cause changed between attempts
    later = [
        *events,
        ev("Failed", FORBIDDEN, when="2026-01-05T09:00:09Z"),
        ev("Failed", "Error: ErrImagePull"),
    ]
    assert _pull_event(later, "api") == later[5]
    # bare errors alone say nothing: no event, so the diagnosis falls back to the container's waiting message
    assert _pull_event([events[2], events[4]], "api") is None
    # an invalid name is reported by the reference parser under InspectFailed
    invalid = [ev("InspectFailed", INVALID), ev("Failed", "Error: InvalidImageName")]
    assert _pull_event(invalid, "api") == invalid[0]


def test_pull_event_of_a_sidecar_is_not_taken_for_the_container() -> None:
    sidecar = ev(
        "Failed",
        FORBIDDEN.replace(IMG, "docker.io/prom/statsd-exporter:v0"),
        "metrics",
        "2026-01-05T09:00:05Z",
    )
    events = [ev("Failed", NOT_FOUND, "api"), sidecar, ev("Failed", "Error: ErrImagePull", "metrics")]
    assert _pull_event(events, "api") == events[0]
    assert _pull_event(events, "metrics") == sidecar
    assert _pull_event([sidecar], "api") is None


# ------------------------------------------------------------------------- each cause on a simulated cluster


async def fail_rollout(
    cluster: SimCluster, clients: KubeClients, diagnoser: Diagnoser, image: str
) -> Diagnosis:
    set_image(cluster, "api", image)
    with pytest.raises(RolloutFailed) as err:
        await watch_rollout(
            clients[cluster.context], NS, "funnelcake-api", diagnoser=diagnoser, give_up_after=20
        )
    assert err.value.diagnosis is not None
    return err.value.diagnosis


@pytest.fixture
async def diagnoser(cfg: FunnelcakeConfig) -> AsyncIterator[Diagnoser]:
    async with RegistryClient(attempts=1) as rc:
        yield Diagnoser(
            cfg.env("staging"), cfg.environments, check=rc.check, node_service_account="nodes@x.iam"
        )


async def test_tag_missing_everywhere_says_build(
    sim_cluster: SimCluster, staging_clients: KubeClients, cfg: FunnelcakeConfig, diagnoser: Diagnoser
) -> None:
    d = await fail_rollout(
        sim_cluster, staging_clients, diagnoser, cfg.env("staging").image_ref("funnelcake-api", "abcdef0")
    )
    assert d.kind is Cause.TAG_MISSING
    assert d.promote_from == ()
    assert "missing from the staging registry" in d.cause
    assert d.evidence.endswith("funnelcake-api:abcdef0: not found")
    assert "build it for linux/amd64" in d.fix


async def test_wrong_platform_names_the_platforms_found(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    cfg: FunnelcakeConfig,
    diagnoser: Diagnoser,
    registries: Registries,
) -> None:
    await registries.push("staging", "funnelcake-api", "a4a4a4a", "arm64", seed="mac-build")
    d = await fail_rollout(
        sim_cluster, staging_clients, diagnoser, cfg.env("staging").image_ref("funnelcake-api", "a4a4a4a")
    )
    assert d.kind is Cause.WRONG_PLATFORM
    assert "no match for platform in manifest" in d.evidence
    assert d.details["platforms found"] == "linux/arm64"
    assert "linux/amd64" in d.fix


async def test_registry_auth_failure_names_the_node_account_fix(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    cfg: FunnelcakeConfig,
    diagnoser: Diagnoser,
    registries: Registries,
) -> None:
    await registries.push("staging", "funnelcake-api", "b5b5b5b", "amd64", seed="ok")
    sim_cluster.deny_registry_pulls = True
    d = await fail_rollout(
        sim_cluster, staging_clients, diagnoser, cfg.env("staging").image_ref("funnelcake-api", "b5b5b5b")
    )
    assert d.kind is Cause.REGISTRY_AUTH
    assert "403 Forbidden" in d.evidence
    assert "roles/artifactregistry.reader" in d.fix
    assert "serviceAccount:nodes@x.iam" in d.fix
    assert d.details["registry says"].startswith("ok")  # the image is there: the nodes may not read it


async def test_crash_loop_quotes_the_last_log_lines_and_exit_code(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    cfg: FunnelcakeConfig,
    diagnoser: Diagnoser,
    registries: Registries,
) -> None:
    await registries.push("staging", "funnelcake-api", "c6c6c6c", "amd64", seed="crashy")
    sim_cluster.crash_tags.add("c6c6c6c")
    d = await fail_rollout(
        sim_cluster, staging_clients, diagnoser, cfg.env("staging").image_ref("funnelcake-api", "c6c6c6c")
    )
    assert d.kind is Cause.CRASH_LOOP
    assert d.details["exit code"] == "1"
    assert "panic: testbed: tag c6c6c6c is marked to crash" in d.evidence
    assert "exit code 1" in d.cause


async def test_exec_format_error_means_wrong_architecture(
    sim_cluster: SimCluster,
    staging_clients: KubeClients,
    cfg: FunnelcakeConfig,
    diagnoser: Diagnoser,
    registries: Registries,
) -> None:
    await registries.push("staging", "funnelcake-api", "d7d7d7d", "amd64", seed="mislabelled")
    sim_cluster.exec_format_tags.add("d7d7d7d")
    d = await fail_rollout(
        sim_cluster, staging_clients, diagnoser, cfg.env("staging").image_ref("funnelcake-api", "d7d7d7d")
    )
    assert d.kind is Cause.EXEC_FORMAT
    assert "exec format error" in d.evidence
    assert "linux/amd64" in d.fix


async def test_invalid_image_name(
    sim_cluster: SimCluster, staging_clients: KubeClients, diagnoser: Diagnoser
) -> None:
    d = await fail_rollout(sim_cluster, staging_clients, diagnoser, "funnelcake-api:Not A Tag")
    assert d.kind is Cause.INVALID_IMAGE
    assert d.evidence.endswith("invalid reference format")  # the InspectFailed event, not `Error: …`


async def test_pending_pod_quotes_the_scheduler(
    sim_cluster: SimCluster, staging_clients: KubeClients, diagnoser: Diagnoser
) -> None:
    msg = "0/2 nodes are available: 2 Insufficient memory. preemption: 0/2 nodes are available."
    pod = {
        "metadata": {"name": "funnelcake-api-x-1", "namespace": NS},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg}
            ],
        },
    }
    d = await diagnoser.diagnose(staging_clients[sim_cluster.context], pod)
    assert d is not None
    assert d.kind is Cause.PENDING
    assert d.evidence == msg
    # a running pod has nothing to diagnose
    running = {"metadata": {"name": "p", "namespace": NS}, "status": {"phase": "Running"}}
    assert await diagnoser.diagnose(staging_clients[sim_cluster.context], running) is None


async def test_a_pod_backing_off_is_diagnosed_from_the_detailed_pull_event(
    sim_cluster: SimCluster, staging_clients: KubeClients, cfg: FunnelcakeConfig, diagnoser: Diagnoser
) -> None:
    image = cfg.env("staging").image_ref("funnelcake-api", "abcdef1")
    set_image(sim_cluster, "api", image)

    def backing_off() -> dict[str, Any] | None:
        pods, _ = sim_cluster.store.list("pods", NS, label_selector="app.kubernetes.io/name=funnelcake-api")
        for pod in pods:
            if (failing_reason(pod) or ("", {}))[0] != "ImagePullBackOff":
                continue
            events, _ = sim_cluster.store.list(
                "events", NS, field_selector=f"involvedObject.name={pod['metadata']['name']}"
            )
            if events and events[-1]["message"] == "Error: ImagePullBackOff":
                return pod
        return None

    async with asyncio.timeout(10):
        while (pod := backing_off()) is None:
            await asyncio.sleep(0.02)
    d = await diagnoser.diagnose(staging_clients[sim_cluster.context], pod)
    assert d is not None
    assert d.kind is Cause.TAG_MISSING
    assert d.evidence.startswith(f'Failed to pull image "{image}": rpc error: code = NotFound')
