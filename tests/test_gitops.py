"""GitOpsRepo against a real bare remote and real kustomize: in-place bumps, races, conflicts, render checks."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from bot.adapters import gitops
from bot.adapters.gitops import GitOpsRepo
from bot.adapters.gitutil import GitCredentials
from bot.adapters.overlays import commit_message, find_image_tag, read_image_tag, set_image_tag
from bot.errors import PermanentError, TransientError
from bot.settings import FunnelcakeConfig, Service
from tests.testbed.gitrepos import (
    ENVS,
    SERVICES,
    GitOpsRemote,
    RefusingGitHost,
    git_out,
    push_from_second_clone,
    remote_file,
    remote_head,
)

NEW = "e7e79eb"
TOKEN = "ghs_TESTBEDtoken0123456789abcdefSECRET"


@pytest.fixture
def repo(gitops_remote: GitOpsRemote, tmp_path: Path) -> GitOpsRepo:
    return GitOpsRepo(gitops_remote.url, tmp_path / "clone", retry_delay=0.01)


def _clean(repo: GitOpsRepo, gitops_remote: GitOpsRemote) -> None:
    """The clone has no local change and sits exactly on the remote branch."""
    assert git_out(repo.clone_dir, "status", "--porcelain", "--untracked-files=all") == ""
    assert git_out(repo.clone_dir, "rev-parse", "HEAD") == remote_head(gitops_remote.path)
    assert git_out(repo.clone_dir, "rev-parse", "--abbrev-ref", "HEAD") == "main"


def _envs(cfg: FunnelcakeConfig, *names: str) -> list[Any]:
    return [cfg.env(n) for n in names]


async def test_read_tags(repo: GitOpsRepo, git_config: FunnelcakeConfig, gitops_remote: GitOpsRemote) -> None:
    tags = await repo.read_tags(git_config)
    assert tags == {env: {s: gitops_remote.tags[env] for s in Service} for env in ENVS}


async def test_bump_one_env(
    repo: GitOpsRepo, git_config: FunnelcakeConfig, gitops_remote: GitOpsRemote
) -> None:
    before = remote_head(gitops_remote.path)
    res = await repo.bump(_envs(git_config, "staging"), NEW, requester="U0123ABC", deploy_id="d-42")
    assert not res.noop
    assert res.attempts == 1
    assert res.commit == remote_head(gitops_remote.path)
    assert res.previous == {"staging": {s: gitops_remote.tags["staging"] for s in Service}}
    assert git_out(gitops_remote.path, "rev-parse", f"{res.commit}^") == before
    message = git_out(gitops_remote.path, "log", "-1", "--format=%B", "main")
    assert message.splitlines()[0] == f"deploy(staging): funnelcake @ {NEW}"
    assert "Requested-by: U0123ABC" in message
    assert "Deploy-Id: d-42" in message
    assert f"staging: api {gitops_remote.tags['staging']}, relay {gitops_remote.tags['staging']}" in message
    author = git_out(gitops_remote.path, "log", "-1", "--format=%an <%ae>", "main")
    assert author.startswith("funnelcake-deploy-bot <")
    changed = git_out(gitops_remote.path, "diff", "--name-only", before, "main").split()
    assert sorted(changed) == sorted(GitOpsRemote.overlay(s, "staging") for s in SERVICES)
    tags = await repo.read_tags(git_config)
    assert tags["staging"] == {Service.API: NEW, Service.RELAY: NEW}
    assert tags["poc"] == {s: gitops_remote.tags["poc"] for s in Service}
    _clean(repo, gitops_remote)


async def test_one_commit_for_all_envs_and_only_tag_lines_change(
    repo: GitOpsRepo, git_config: FunnelcakeConfig, gitops_remote: GitOpsRemote
) -> None:
    before = remote_head(gitops_remote.path)
    res = await repo.bump(
        _envs(git_config, "poc", "staging", "production"), NEW, requester="U1", deploy_id="d-1"
    )
    assert git_out(gitops_remote.path, "rev-list", "--count", f"{before}..main") == "1"
    assert git_out(gitops_remote.path, "log", "-1", "--format=%s", "main") == (
        f"deploy(poc, staging, production): funnelcake @ {NEW}"
    )
    assert len(res.files) == 6
    for service in SERVICES:
        for env in ENVS:
            path = GitOpsRemote.overlay(service, env)
            old = remote_file(gitops_remote.path, path, before).splitlines(keepends=True)
            new = remote_file(gitops_remote.path, path, "main").splitlines(keepends=True)
            assert len(old) == len(new), path
            diff = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
            assert len(diff) == 1, path
            a, b = diff[0]
            assert b"newTag" in a
            assert a.replace(gitops_remote.tags[env].encode(), NEW.encode()) == b, path
    crlf = remote_file(gitops_remote.path, GitOpsRemote.overlay("relay", "poc"), "main")
    assert crlf.count(b"\r\n") == crlf.count(b"\n")
    sidecar = remote_file(gitops_remote.path, GitOpsRemote.overlay("relay", "staging"), "main")
    assert b'newTag: "v0.26.1"' in sidecar
    _clean(repo, gitops_remote)


async def test_noop_when_already_at_the_tag(
    repo: GitOpsRepo, git_config: FunnelcakeConfig, gitops_remote: GitOpsRemote
) -> None:
    before = remote_head(gitops_remote.path)
    res = await repo.bump(
        _envs(git_config, "staging"), gitops_remote.tags["staging"], requester="U1", deploy_id="d-1"
    )
    assert res.noop
    assert res.commit is None
    assert res.attempts == 0
    assert remote_head(gitops_remote.path) == before
    _clean(repo, gitops_remote)


async def test_push_race_is_rebased_and_retried(
    repo: GitOpsRepo,
    git_config: FunnelcakeConfig,
    gitops_remote: GitOpsRemote,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    theirs: list[str] = []
    real_push = repo._push

    def push_after_a_colleague() -> bool:
        # between our commit and our push, someone else lands a commit on main
        if not theirs:
            theirs.append(
                push_from_second_clone(
                    gitops_remote.url,
                    GitOpsRemote.overlay("api", "poc"),
                    lambda t: t.replace("# poc tracks", "# poc (shared) tracks"),
                    "poc: clarify comment",
                )
            )
        return real_push()

    monkeypatch.setattr(repo, "_push", push_after_a_colleague)
    res = await repo.bump(_envs(git_config, "staging"), NEW, requester="U1", deploy_id="d-1")
    assert res.attempts == 2
    assert res.commit == remote_head(gitops_remote.path)
    assert git_out(gitops_remote.path, "rev-parse", f"{res.commit}^") == theirs[0]
    poc = remote_file(gitops_remote.path, GitOpsRemote.overlay("api", "poc")).decode()
    assert "# poc (shared) tracks" in poc
    assert (await repo.read_tags(git_config))["staging"][Service.API] == NEW
    _clean(repo, gitops_remote)


async def test_push_race_lost_every_time_is_transient(
    repo: GitOpsRepo,
    git_config: FunnelcakeConfig,
    gitops_remote: GitOpsRemote,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_push = repo._push
    n = 0

    def always_beaten() -> bool:
        nonlocal n
        n += 1
        push_from_second_clone(gitops_remote.url, "README.md", lambda t: t + f"{n}\n", f"docs {n}")
        return real_push()

    monkeypatch.setattr(repo, "_push", always_beaten)
    with pytest.raises(TransientError, match="rejected 3 times"):
        await repo.bump(_envs(git_config, "poc"), NEW, requester="U1", deploy_id="d-1", max_attempts=3)
    assert (await repo.read_tags(git_config))["poc"][Service.API] == gitops_remote.tags["poc"]
    _clean(repo, gitops_remote)


async def test_rebase_conflict_is_a_clean_error(
    repo: GitOpsRepo,
    git_config: FunnelcakeConfig,
    gitops_remote: GitOpsRemote,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_push = repo._push
    path = GitOpsRemote.overlay("api", "staging")

    hotfixed = False

    def conflicting_push() -> bool:
        nonlocal hotfixed
        if not hotfixed:
            hotfixed = True
            push_from_second_clone(
                gitops_remote.url,
                path,
                lambda t: t.replace(gitops_remote.tags["staging"], "1111111"),
                "hotfix",
            )
        return real_push()

    monkeypatch.setattr(repo, "_push", conflicting_push)
    with pytest.raises(PermanentError) as e:
        await repo.bump(_envs(git_config, "staging"), NEW, requester="U1", deploy_id="d-1")
    assert path in e.value.message
    assert "Nothing was pushed" in e.value.message
    assert b"1111111" in remote_file(gitops_remote.path, path)
    _clean(repo, gitops_remote)
    assert not (repo.clone_dir / ".git" / "rebase-merge").exists()
    # the clone is usable straight away
    res = await repo.bump(_envs(git_config, "poc"), NEW, requester="U1", deploy_id="d-2")
    assert res.commit == remote_head(gitops_remote.path)


async def test_colleague_pushed_the_same_tag_is_a_noop(
    repo: GitOpsRepo,
    git_config: FunnelcakeConfig,
    gitops_remote: GitOpsRemote,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_push = repo._push
    first = True

    def same_change_lands_first() -> bool:
        nonlocal first
        if first:
            first = False
            for s in SERVICES:
                push_from_second_clone(
                    gitops_remote.url,
                    GitOpsRemote.overlay(s, "staging"),
                    lambda t: t.replace(f'"{gitops_remote.tags["staging"]}"', f'"{NEW}"').replace(
                        f"'{gitops_remote.tags['staging']}'", f"'{NEW}'"
                    ),
                    "same bump by hand",
                )
        return real_push()

    monkeypatch.setattr(repo, "_push", same_change_lands_first)
    res = await repo.bump(_envs(git_config, "staging"), NEW, requester="U1", deploy_id="d-1")
    assert res.noop
    assert res.commit is None
    _clean(repo, gitops_remote)


async def test_render_check_catches_an_image_name_the_base_does_not_use(
    repo: GitOpsRepo, git_config: FunnelcakeConfig, gitops_remote: GitOpsRemote
) -> None:
    push_from_second_clone(
        gitops_remote.url,
        "k8s/applications/funnelcake-api/base/deployment.yaml",
        lambda t: t.replace("image: funnelcake-api", "image: ghcr.io/divinevideo/funnelcake-api"),
        "api: pull from ghcr",
    )
    before = remote_head(gitops_remote.path)
    with pytest.raises(PermanentError) as e:
        await repo.bump(_envs(git_config, "staging"), NEW, requester="U1", deploy_id="d-1")
    assert GitOpsRemote.overlay("api", "staging") in e.value.message
    assert "ghcr.io/divinevideo/funnelcake-api" in e.value.message
    assert git_config.env("staging").image_ref("funnelcake-api", NEW) in e.value.message
    assert remote_head(gitops_remote.path) == before
    _clean(repo, gitops_remote)


async def test_render_check_catches_another_envs_registry(
    repo: GitOpsRepo, git_config: FunnelcakeConfig, gitops_remote: GitOpsRemote
) -> None:
    # The environments file says poc pulls from its own registry, the overlay points elsewhere.
    poc = git_config.env("poc").model_copy(update={"registry": gitops_remote.registries["production"]})
    with pytest.raises(PermanentError, match="newName points at another registry"):
        await repo.bump([poc], NEW, requester="U1", deploy_id="d-1")
    _clean(repo, gitops_remote)


async def test_two_concurrent_bumps_share_the_clone(
    repo: GitOpsRepo, git_config: FunnelcakeConfig, gitops_remote: GitOpsRemote
) -> None:
    before = remote_head(gitops_remote.path)
    a, b = await asyncio.gather(
        repo.bump(_envs(git_config, "staging"), NEW, requester="U1", deploy_id="d-1"),
        repo.bump(_envs(git_config, "poc"), "abcdef0", requester="U2", deploy_id="d-2"),
    )
    assert not a.noop
    assert not b.noop
    assert git_out(gitops_remote.path, "rev-list", "--count", f"{before}..main") == "2"
    tags = await repo.read_tags(git_config)
    assert tags["staging"] == {Service.API: NEW, Service.RELAY: NEW}
    assert tags["poc"] == {Service.API: "abcdef0", Service.RELAY: "abcdef0"}
    _clean(repo, gitops_remote)


async def test_cancelled_bump_leaves_the_clone_clean(
    repo: GitOpsRepo,
    git_config: FunnelcakeConfig,
    gitops_remote: GitOpsRemote,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rendering = asyncio.Event()

    async def slow_render(kubectl: str, rel: str, overlay_dir: Path, expected: str, *, limit: float) -> None:
        rendering.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(gitops, "render_check", slow_render)
    before = remote_head(gitops_remote.path)
    task = asyncio.create_task(
        repo.bump(_envs(git_config, "staging"), NEW, requester="U1", deploy_id="d-1"), name="bump-under-test"
    )
    await asyncio.wait_for(rendering.wait(), 10)
    assert git_out(repo.clone_dir, "status", "--porcelain") != ""  # edited, not yet committed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert remote_head(gitops_remote.path) == before
    _clean(repo, gitops_remote)


async def test_missing_overlay_file_names_it(
    repo: GitOpsRepo, git_config: FunnelcakeConfig, gitops_remote: GitOpsRemote
) -> None:
    env = git_config.env("poc")
    broken = env.model_copy(
        update={
            "overlays": {
                **env.overlays,
                Service.API: "k8s/applications/funnelcake-api/overlays/poc2/kustomization.yaml",
            }
        }
    )
    with pytest.raises(PermanentError, match=r"overlays/poc2/kustomization\.yaml .* does not exist"):
        await repo.bump([broken], NEW, requester="U1", deploy_id="d-1")
    escaping = env.model_copy(update={"overlays": {**env.overlays, Service.API: "../../etc/passwd.yaml"}})
    with pytest.raises(PermanentError, match="must be a relative path"):
        await repo.bump([escaping], NEW, requester="U1", deploy_id="d-1")
    _clean(repo, gitops_remote)


async def test_invalid_tag_is_refused_before_touching_git(
    repo: GitOpsRepo, git_config: FunnelcakeConfig
) -> None:
    with pytest.raises(PermanentError, match="not a valid image tag"):
        await repo.bump(_envs(git_config, "poc"), "abc 123\nnewTag: x", requester="U1", deploy_id="d")
    assert not repo.clone_dir.exists()


async def test_https_token_never_in_errors(
    refusing_git_host: RefusingGitHost, tmp_path: Path, git_config: FunnelcakeConfig
) -> None:
    repo = GitOpsRepo(
        refusing_git_host.url, tmp_path / "clone", credentials=GitCredentials(https_token=SecretStr(TOKEN))
    )
    with pytest.raises(PermanentError) as e:
        await repo.bump(_envs(git_config, "poc"), NEW, requester="U1", deploy_id="d")
    assert TOKEN not in f"{e.value} {e.value!r}"
    assert "Cloning" in e.value.message
    offered = [base64.b64decode(a.split()[1]).decode() for a in refusing_git_host.authorizations]
    assert f"x-access-token:{TOKEN}" in offered


def test_commit_message_format(git_config: FunnelcakeConfig) -> None:
    msg = commit_message(
        _envs(git_config, "staging", "poc"),
        NEW,
        requester="U1\nInjected-By: evil",
        deploy_id="d-9",
        previous={
            "staging": {Service.API: "a", Service.RELAY: "b"},
            "poc": {Service.API: "c", Service.RELAY: "d"},
        },
    )
    lines = msg.splitlines()
    assert lines[0] == f"deploy(staging, poc): funnelcake @ {NEW}"
    assert lines[1] == ""
    assert "Requested-by: U1 Injected-By: evil" in lines
    assert "  staging: api a, relay b" in lines
    assert "  poc: api c, relay d" in lines


# -- the in-place editor -------------------------------------------------------------------------------


def test_editor_errors_name_the_file() -> None:
    src = "images:\n  - name: funnelcake-relay\n    newTag: x\n"
    with pytest.raises(PermanentError, match=re.escape("f.yaml has no images entry named 'funnelcake-api'")):
        set_image_tag(src, "funnelcake-api", NEW, source="f.yaml")
    with pytest.raises(
        PermanentError, match=re.escape("f.yaml: the images entry 'funnelcake-relay' has no newTag")
    ):
        set_image_tag("images:\n  - name: funnelcake-relay\n", "funnelcake-relay", NEW, source="f.yaml")
    with pytest.raises(PermanentError, match=re.escape("f.yaml is not valid YAML at line 3")):
        set_image_tag("images:\n  - name: [\n", "funnelcake-relay", NEW, source="f.yaml")
    dup = "images:\n- {name: funnelcake-api, newTag: a}\n- {name: funnelcake-api, newTag: b}\n"
    with pytest.raises(PermanentError, match="2 times"):
        set_image_tag(dup, "funnelcake-api", NEW, source="f.yaml")


@pytest.mark.parametrize(
    ("line", "tag", "expected"),
    [
        ("newTag: abc1234", NEW, f"newTag: {NEW}"),
        ("newTag: abc1234", "1234567", 'newTag: "1234567"'),  # a plain int would not be a string
        ("newTag: abc1234", "1e23456", 'newTag: "1e23456"'),  # nor a float in YAML 1.2
        ("newTag: 'abc1234'   # pinned", NEW, f"newTag: '{NEW}'   # pinned"),
        ('newTag: "abc1234"#x', NEW, f'newTag: "{NEW}"#x'),
    ],
)
def test_editor_keeps_or_fixes_the_quoting(line: str, tag: str, expected: str) -> None:
    src = f"images:\n  - name: funnelcake-api\n    {line}\n"
    new, old = set_image_tag(src, "funnelcake-api", tag, source="f")
    assert old == "abc1234"
    assert new == f"images:\n  - name: funnelcake-api\n    {expected}\n"
    assert yaml.safe_load(new)["images"][0]["newTag"] == tag


# -- property: any reasonable overlay survives a bump byte-for-byte outside the tag -------------------

_tag = st.text(alphabet="0123456789abcdef", min_size=7, max_size=7)
_comment = st.text(alphabet=st.characters(codec="ascii", categories=("L", "N", "Zs")), max_size=30).map(
    lambda s: "# " + s.strip()
)
_style = st.sampled_from(["plain", "double", "single"])
_OTHER_IMAGES = ["prom/statsd-exporter", "busybox", "funnelcake-api-canary", "ghcr.io/x/funnelcake-api"]


def _scalar(value: str, style: str) -> str:
    if style == "double" or (style == "plain" and re.fullmatch(r"[0-9]+|[0-9]*e[0-9]+|[0-9]+e[0-9]*", value)):
        return f'"{value}"'
    if style == "single":
        return f"'{value}'"
    return value


@st.composite
def overlays(draw: st.DrawFn) -> tuple[str, str, str]:
    """(file text, target image, its current tag)"""
    target = draw(st.sampled_from(["funnelcake-api", "funnelcake-relay"]))
    others = draw(st.lists(st.sampled_from(_OTHER_IMAGES), max_size=3, unique=True))
    names = draw(st.permutations([target, *others]))
    tags = {n: draw(_tag) for n in names}
    flow = draw(st.booleans())
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    indent = draw(st.sampled_from(["", "  "]))
    entries = []
    for n in names:
        keys = draw(st.permutations(["name", "newName", "newTag"]))
        values = {
            "name": n,
            "newName": f"127.0.0.1:5001/dv-platform-staging/containers-staging/{n.rsplit('/', 1)[-1]}",
            "newTag": _scalar(tags[n], draw(_style)),
        }
        comments = {k: draw(st.one_of(st.none(), _comment)) for k in keys}
        entries.append((keys, values, comments))
    if flow:
        items = ", ".join("{" + ", ".join(f"{k}: {v[k]}" for k in keys) + "}" for keys, v, _ in entries)
        images = [f"images: [{items}]"]
    else:
        images = ["images:"]
        for keys, v, comments in entries:
            if draw(st.booleans()):
                images.append(f"{indent}{draw(_comment)}")
            for i, k in enumerate(keys):
                lead = f"{indent}- " if i == 0 else f"{indent}  "
                tail = f"  {comments[k]}" if comments[k] else ""
                images.append(f"{lead}{k}: {v[k]}{tail}")
    blocks = {
        "apiVersion": ["apiVersion: kustomize.config.k8s.io/v1beta1"],
        "kind": ["kind: Kustomization"],
        "resources": draw(
            st.sampled_from([["resources: [../../base]"], ["resources:", f"{indent}- ../../base"]])
        ),
        "namespace": ["namespace: funnelcake"],
        "images": images,
    }
    lines: list[str] = [draw(_comment) for _ in range(draw(st.integers(0, 2)))]
    for key in draw(st.permutations(list(blocks))):
        if draw(st.booleans()):
            lines.append(draw(_comment))
        lines.extend(blocks[key])
    return newline.join(lines) + newline, target, tags[target]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overlays(), _tag)
def test_bump_changes_only_the_tag(overlay: tuple[str, str, str], new_tag: str) -> None:
    text, image, old_tag = overlay
    assert read_image_tag(text, image, source="f") == old_tag
    new, previous = set_image_tag(text, image, new_tag, source="f")
    assert previous == old_tag
    assert read_image_tag(new, image, source="f") == new_tag
    old_lines, new_lines = text.splitlines(keepends=True), new.splitlines(keepends=True)
    assert len(old_lines) == len(new_lines)
    line = find_image_tag(text, image, source="f").line - 1
    for i, (a, b) in enumerate(zip(old_lines, new_lines, strict=True)):
        if i != line:
            assert a == b
    assert new_lines[line].endswith(old_lines[line][-2:] if old_lines[line].endswith("\r\n") else "\n")
    # the document means the same, apart from the one tag
    expected = yaml.safe_load(text)
    for entry in expected["images"]:
        if entry["name"] == image:
            entry["newTag"] = new_tag
    assert yaml.safe_load(new) == expected
