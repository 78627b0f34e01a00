"""The git test bed is what it claims: deterministic shas, a real push race, overlays that render."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.testbed.gitrepos import (
    ENVS,
    FAILS_HALFWAY_MARKER,
    SERVICES,
    AppRemote,
    GitOpsRemote,
    GitRemotes,
    git,
    git_out,
    push_from_second_clone,
    remote_file,
    remote_head,
    seed_app_repo,
    seed_gitops_repo,
)


def test_app_shas_are_deterministic(tmp_path: Path, app_remote: AppRemote) -> None:
    again = seed_app_repo(tmp_path / "again")
    assert again.commits == app_remote.commits
    assert set(app_remote.commits) >= {
        "initial",
        "api-paginate",
        "add-index",
        "relay-tune",
        "head",
        "broken",
        "collision-a",
        "collision-b",
    }


def test_gitops_shas_are_deterministic(tmp_path: Path, gitops_remote: GitOpsRemote) -> None:
    again = seed_gitops_repo(tmp_path / "again", gitops_remote.registries, gitops_remote.tags)
    assert remote_head(again.path) == remote_head(gitops_remote.path)


def test_app_history_layout(app_remote: AppRemote) -> None:
    c, repo = app_remote.commits, app_remote.path
    main = git_out(repo, "rev-list", "--first-parent", "main").split()
    assert main == [c["head"], c["relay-tune"], c["add-index"], c["api-paginate"], c["initial"]]
    assert git_out(repo, "rev-parse", "v1.4.0^{commit}") == c["relay-tune"]
    assert git_out(repo, "rev-parse", "broken-migration") == c["broken"]
    dockerfile = remote_file(repo, "Dockerfile").decode()
    assert " AS api\n" in dockerfile
    assert " AS relay\n" in dockerfile
    changed = git_out(repo, "diff", "--name-only", c["head"], c["broken"]).split()
    assert "database/migrations/000004_backfill_counts.up.sql" in changed
    body = remote_file(repo, "database/migrations/000004_backfill_counts.up.sql", c["broken"]).decode()
    assert FAILS_HALFWAY_MARKER in body.splitlines()
    mode = git_out(repo, "ls-tree", c["initial"], "database/entrypoint.sh").split()[0]
    assert mode == "100755"
    # api-only and relay-only changes touch only their side
    assert git_out(repo, "diff", "--name-only", c["initial"], c["api-paginate"]).split() == ["api/main.go"]
    assert git_out(repo, "diff", "--name-only", c["add-index"], c["relay-tune"]).split() == [
        "relay/src/config.rs"
    ]


def test_collision_pair_shares_seven_chars(app_remote: AppRemote) -> None:
    a, b = app_remote.commits["collision-a"], app_remote.commits["collision-b"]
    assert a != b
    assert a[:7] == b[:7]
    proc = git(app_remote.path, "rev-parse", "--verify", f"{a[:7]}^{{commit}}", check=False)
    assert proc.returncode != 0
    assert b"ambiguous" in proc.stderr
    # both are reachable from the collision branch, so a fetch brings them
    reachable = git_out(app_remote.path, "rev-list", "collision").split()
    assert a in reachable
    assert b in reachable


def _render(repo_dir: Path, service: str, env: str) -> list[dict[str, object]]:
    overlay = repo_dir / GitOpsRemote.overlay(service, env)
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay.parent)], capture_output=True, timeout=30, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("service", SERVICES)
def test_overlays_render_to_the_expected_image(
    tmp_path: Path, gitops_remote: GitOpsRemote, service: str
) -> None:
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", gitops_remote.url, str(work))
    for env in ENVS:
        docs = _render(work, service, env)
        (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
        assert deploy["metadata"]["name"] == f"funnelcake-{service}"  # type: ignore[index]
        assert deploy["metadata"]["namespace"] == "funnelcake"  # type: ignore[index]
        assert deploy["spec"]["replicas"] == 2  # type: ignore[index]
        containers = deploy["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
        expected = f"{gitops_remote.registries[env]}/funnelcake-{service}:{gitops_remote.tags[env]}"
        assert containers[0]["image"] == expected
        if service == "relay":
            sidecar = "prom/statsd-exporter:" + ("v0.26.1" if env == "staging" else "v0.26.0")
            assert containers[1]["image"] == sidecar


def test_overlay_styles_are_varied(gitops_remote: GitOpsRemote) -> None:
    text = {
        (s, e): remote_file(gitops_remote.path, GitOpsRemote.overlay(s, e)) for s in SERVICES for e in ENVS
    }
    assert b"\r\n" in text[("relay", "poc")]
    assert all(b"\r\n" not in v for k, v in text.items() if k != ("relay", "poc"))
    assert b"images: [{name: funnelcake-relay" in text[("relay", "production")]
    assert b"newTag: '" in text[("api", "staging")]
    assert f"newTag: {gitops_remote.tags['poc']}\n".encode() in text[("api", "poc")]
    assert b"prom/statsd-exporter" in text[("relay", "staging")]


def test_push_race_is_rejected_with_fetch_first(tmp_path: Path, gitops_remote: GitOpsRemote) -> None:
    ours = tmp_path / "ours"
    git(tmp_path, "clone", "-q", gitops_remote.url, str(ours))
    (ours / "README.md").write_text("ours\n")
    ident = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }
    git(ours, "commit", "-q", "-am", "ours", env=ident)

    theirs = push_from_second_clone(
        gitops_remote.url,
        "k8s/applications/other-service/base/kustomization.yaml",
        lambda t: t + "# x\n",
        "theirs",
    )
    assert remote_head(gitops_remote.path) == theirs

    proc = git(ours, "push", "origin", "HEAD:main", check=False)
    assert proc.returncode != 0
    assert b"fetch first" in proc.stderr or b"non-fast-forward" in proc.stderr
    assert remote_head(gitops_remote.path) == theirs


async def test_git_remotes_usable_outside_pytest(tmp_path: Path) -> None:
    regs = {e: f"127.0.0.1:5001/dv-{e}/containers-{e}" for e in ENVS}
    async with GitRemotes(tmp_path / "r", registries=regs, deployed={e: "head" for e in ENVS}) as remotes:
        assert remotes.gitops.tags == {e: remotes.app.short("head") for e in ENVS}
        api = remote_file(remotes.gitops.path, GitOpsRemote.overlay("api", "staging")).decode()
        assert f"newName: {regs['staging']}/funnelcake-api" in api
    assert not (tmp_path / "r" / "divine-funnelcake.git").exists()
