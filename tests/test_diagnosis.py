"""Diagnosis: classification of containerd pull messages (pure) and each cause on a simulated cluster."""

from __future__ import annotations

import pytest

from bot.adapters.diagnosis import (
    PullFailure,
    classify_pull_error,
    failing_reason,
    registry_reader_command,
    split_image,
)

IMG = "us-central1-docker.pkg.dev/rich-compiler-479518-d2/containers-poc/funnelcake-api:e7e79eb"

# The kubelet event texts of DESIGN.md §5, as containerd words them.
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
INVALID = 'Failed to apply default image tag "Funnelcake:UPPER": couldn\'t parse image reference "Funnelcake:UPPER": invalid reference format'


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
