"""Promotion gates and commit hygiene: production takes only what succeeded in staging (same digests),
an admin overrides with a reason kept in the ledger and as a trailer, deploy commits end with trailers
`git interpret-trailers --parse` reads back, and are signed with the configured SSH key.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from bot.adapters.gitops import GitOpsRepo
from bot.adapters.overlays import set_image_digest
from bot.cli import render_status
from bot.errors import PermanentError
from bot.ledger.models import DeployKind, DeployState
from bot.models import Plan
from bot.service import DeployService
from bot.settings import FunnelcakeConfig, Promotion
from bot.wiring import build_service
from handlers.blocks import plan_blocks
from tests.test_failure_modes import ALICE, BOB, live_image, overlay_tag, parts, publish
from tests.test_slack_front import push_head
from tests.testbed.botrun import RunningBot
from tests.testbed.gitrepos import GitOpsRemote, git_out, overlay_path, remote_file, remote_head
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import FakeSlack

CAROL = "U0CAROL"


def gated(config: FunnelcakeConfig) -> FunnelcakeConfig:
    """The environments file with production gated on staging."""
    envs = [
        e.model_copy(update={"promotion": Promotion(after="staging")}) if e.name == "production" else e
        for e in config.environments
    ]
    return config.model_copy(update={"environments": envs})


@pytest.fixture
async def gated_svc(sandbox: Sandbox) -> AsyncIterator[DeployService]:
    assert sandbox.config is not None
    async with build_service(sandbox.settings(), gated(sandbox.config)) as service:
        yield service


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)


def trailers(repo: Path, rev: str = "main") -> dict[str, str]:
    message = git_out(repo, "log", "-1", "--format=%B", rev)
    parsed = subprocess.run(
        ["git", "interpret-trailers", "--parse"], input=message, capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split(": ", 1) for line in parsed.splitlines())


async def test_production_takes_only_what_ran_in_staging_unless_an_admin_overrides(
    sandbox: Sandbox, gated_svc: DeployService
) -> None:
    svc = gated_svc
    git, _ = parts(sandbox)
    short = git.app.short("head")
    await publish(sandbox, "production", short)  # CI built it into production's registry

    # skipping staging is refused, naming what is missing and which deploy would satisfy it
    refused = await svc.wait((await svc.start(DeployKind.DEPLOY, ["production"], short, ALICE)).record.id)
    assert refused.state is DeployState.FAILED
    assert (
        f"production takes only commits that succeeded in staging: {short} has no successful staging deploy. "
        f"Deploy it there first: `deploy staging {short}`. An admin can go past the gate: `--override <reason>`"
    ) in (refused.message or "")
    status = await svc.status()
    production = next(e for e in status.envs if e.env == "production")
    assert production.eligible == []
    assert "  eligible: nothing has passed the gate yet" in render_status(status)

    # an admin overrides it, with a reason: recorded in the ledger and as a trailer of the GitOps commit
    reason = "staging cluster is down; hotfix for the relay outage"
    started = await svc.start(DeployKind.DEPLOY, ["production"], short, CAROL, override_reason=reason)
    waiting = await svc.wait(started.record.id)
    assert waiting.state is DeployState.AWAITING_APPROVAL, waiting.message
    assert waiting.plan is not None
    assert waiting.plan["override_reason"] == reason
    assert waiting.plan["overridden"] == [
        f"production takes only commits that succeeded in staging: {short} has no successful staging deploy. "
        f"Deploy it there first: `deploy staging {short}`"
    ]
    assert "*Promotion gate overridden*: staging cluster is down" in str(
        plan_blocks(Plan.from_json(waiting.plan))
    )
    await svc.decide(started.record.id, BOB, approve=True)
    done = await svc.wait(started.record.id)
    assert done.state is DeployState.SUCCEEDED, done.message
    assert overlay_tag(sandbox, "production", "api") == short
    found = trailers(git.gitops.path)
    assert found == {
        "Deploy-Id": done.id,
        "Requested-by": CAROL,
        "Approved-by": BOB,
        "Override-Reason": reason,
    }


async def test_a_commit_that_ran_in_staging_is_eligible_for_production(
    sandbox: Sandbox, gated_svc: DeployService
) -> None:
    svc = gated_svc
    git, _ = parts(sandbox)
    short = git.app.short("head")
    await publish(sandbox, "production", short)
    staged = await svc.wait((await svc.start(DeployKind.DEPLOY, ["staging"], short, ALICE)).record.id)
    assert staged.state is DeployState.SUCCEEDED, staged.message
    assert trailers(git.gitops.path) == {"Deploy-Id": staged.id, "Requested-by": ALICE}

    status = await svc.status()
    production = next(e for e in status.envs if e.env == "production")
    assert production.eligible == [f"{short} (staging {staged.id})"]
    plan, result = await svc.plan(["production"], short, ALICE)
    assert result.ok, result.failed
    assert plan is not None and plan.overridden == []


async def test_deploy_commits_are_signed_with_the_configured_ssh_key(
    gitops_remote: GitOpsRemote, git_config: FunnelcakeConfig, tmp_path: Path
) -> None:
    key = tmp_path / "signing_key"
    await asyncio.to_thread(run, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bot", "-f", str(key))
    repo = GitOpsRepo(
        gitops_remote.url,
        tmp_path / "clone",
        author=("Deploy Bot", "deploy-bot@example.org"),
        signing_key=key,
        retry_delay=0.01,
    )
    before = remote_head(gitops_remote.path)
    await repo.bump([git_config.env("poc")], "e7e79eb", requester="U0ALICE", deploy_id="d-7")
    assert remote_head(gitops_remote.path) != before
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f"deploy-bot@example.org {(tmp_path / 'signing_key.pub').read_text()}")
    verify = ("git", "-c", f"gpg.ssh.allowedSignersFile={allowed}", "verify-commit", "main")
    verified = await asyncio.to_thread(run, *verify, cwd=gitops_remote.path)
    assert verified.returncode == 0, verified.stderr
    assert 'Good "git" signature for deploy-bot@example.org' in verified.stderr
    who = git_out(gitops_remote.path, "log", "-1", "--format=%an <%ae> / %cn <%ce>", "main")
    assert who == "Deploy Bot <deploy-bot@example.org> / Deploy Bot <deploy-bot@example.org>"
    # unsigned by default: nothing to verify
    plain = GitOpsRepo(gitops_remote.url, tmp_path / "plain", retry_delay=0.01)
    await plain.bump([git_config.env("staging")], "e7e79eb", requester="U0ALICE", deploy_id="d-8")
    unsigned = await asyncio.to_thread(run, *verify, cwd=gitops_remote.path)
    assert unsigned.returncode != 0


async def test_slack_deploys_name_the_people_in_the_trailers(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox
) -> None:
    """An auditor reading the GitOps history needs no Slack: the requester and the approver are named
    `Name <email>` from the workspace directory."""
    assert bot.service is not None and sandbox.git is not None
    short = await push_head(sandbox)
    await publish(sandbox, "production", short)
    await bot.command(f"deploy production {short}", user="U0ALICE")
    await bot.settle()
    [waiting] = await bot.service.history("production", 1)
    assert waiting.state is DeployState.AWAITING_APPROVAL, waiting.message
    await bot.click(str(waiting.thread_ts), "approve", user="U0BOB")
    await bot.settle()
    done = await bot.service.deps.ledger.get_deploy(waiting.id)
    assert done.state is DeployState.SUCCEEDED, done.message
    assert trailers(sandbox.git.gitops.path) == {
        "Deploy-Id": done.id,
        "Requested-by": "Alice Archer <alice@funnelcake.test>",
        "Approved-by": "Bob Baker <bob@funnelcake.test>",
    }


def pinned(config: FunnelcakeConfig) -> FunnelcakeConfig:
    """The environments file with `repos.gitops.pin_digests: true`."""
    gitops = config.repos.gitops.model_copy(update={"pin_digests": True})
    return config.model_copy(update={"repos": config.repos.model_copy(update={"gitops": gitops})})


async def test_a_digest_pinned_deploy_runs_exactly_the_image_it_checked(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    assert sandbox.config is not None
    git, clusters = parts(sandbox)
    short = git.app.short("head")
    digests = await publish(sandbox, "poc", short)
    async with build_service(sandbox.settings(), pinned(sandbox.config)) as svc:
        record = await svc.wait((await svc.start(DeployKind.DEPLOY, ["poc"], short, ALICE)).record.id)
        assert record.state is DeployState.SUCCEEDED, record.message
    env = sandbox.config.env("poc")
    for service in ("api", "relay"):
        image = f"funnelcake-{service}"
        text = remote_file(git.gitops.path, overlay_path(service, "poc")).decode()
        entry = next(i for i in yaml.safe_load(text)["images"] if i["name"] == image)
        assert entry["newTag"] == short, text  # read back as this very string, however it is quoted
        assert f"digest: {digests[image]}" in text, text
        # the GitOps repo renders it with real kustomize, and the cluster runs that very reference
        want = f"{env.image_ref(image, short)}@{digests[image]}"
        clone = tmp_path / "gitops"
        if not clone.exists():
            run("git", "clone", "-q", str(git.gitops.path), str(clone))
        rendered = run("kubectl", "kustomize", str((clone / overlay_path(service, "poc")).parent))
        assert rendered.returncode == 0, rendered.stderr
        assert f"image: {want}" in rendered.stdout
        assert live_image(sandbox, "poc", image) == want
        pods = [
            p
            for p in clusters["poc"].store.list("pods", "funnelcake")[0]
            if p["spec"]["containers"][0]["image"] == want and not p["metadata"].get("deletionTimestamp")
        ]
        assert pods and all(p["status"]["phase"] == "Running" for p in pods)


def test_the_digest_line_sits_next_to_new_tag_and_a_stale_one_is_dropped() -> None:
    digest = "sha256:" + "a" * 64
    block = 'images:\n  - name: relay\n    newName: reg/relay\n    newTag: "abc1234"  # pinned by the bot\n'
    pinned_text = set_image_digest(block, "relay", digest, source="k.yaml")
    assert pinned_text == block + f"    digest: {digest}\n"
    assert set_image_digest(pinned_text, "relay", None, source="k.yaml") == block  # pinning switched off
    flow = "images: [{name: relay, newTag: abc1234}]\n"
    assert set_image_digest(flow, "relay", digest, source="k.yaml") == (
        f"images: [{{name: relay, newTag: abc1234, digest: {digest}}}]\n"
    )
    with pytest.raises(PermanentError, match="is not an image digest"):
        set_image_digest(block, "relay", "sha256:nothex", source="k.yaml")
