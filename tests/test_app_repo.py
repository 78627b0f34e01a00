"""AppRepo against a real bare remote: resolving refs (F9), changelogs, migration detection, credentials."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from bot.adapters.apprepo import AppRepo
from bot.adapters.gitutil import GitCredentials, GitRunner, display_url, scrub
from bot.errors import PermanentError, TransientError
from tests.testbed.gitrepos import AppRemote, RefusingGitHost, git_out, push_from_second_clone

TOKEN = "ghs_TESTBEDtoken0123456789abcdefSECRET"


@pytest.fixture
def repo(app_remote: AppRemote, tmp_path: Path) -> AppRepo:
    return AppRepo(app_remote.url, tmp_path / "mirror", fetch_ttl=3600)


async def test_resolve_full_and_short_sha(repo: AppRepo, app_remote: AppRemote) -> None:
    sha = app_remote.commits["add-index"]
    full = await repo.resolve(sha)
    short = await repo.resolve(sha[:7].upper())
    assert full == short
    assert full.sha == sha
    assert full.short == sha[:7]
    assert full.subject == "db: bloom-filter index on events.pubkey"
    assert full.author == "Ada Okafor"
    assert full.authored_at.isoformat() == "2026-01-05T18:00:00+00:00"


async def test_resolve_branch_and_annotated_tag(repo: AppRepo, app_remote: AppRemote) -> None:
    assert (await repo.resolve("main")).sha == app_remote.commits["head"]
    assert (await repo.head()).sha == app_remote.commits["head"]
    assert (await repo.resolve("v1.4.0")).sha == app_remote.commits["relay-tune"]
    assert (await repo.resolve("broken-migration")).sha == app_remote.commits["broken"]


async def test_unknown_branch_suggests_close_names(repo: AppRepo) -> None:
    with pytest.raises(PermanentError) as e:
        await repo.resolve("broken-migraton")
    assert "'broken-migraton' is not a commit, branch or tag of divine-funnelcake" in e.value.message
    assert e.value.hint is not None
    assert "broken-migration" in e.value.hint


async def test_unknown_sha_suggests_the_near_miss(repo: AppRepo, app_remote: AppRemote) -> None:
    sha = app_remote.commits["relay-tune"]
    typo = sha[:6] + ("0" if sha[6] != "0" else "1")
    with pytest.raises(PermanentError) as e:
        await repo.resolve(typo)
    assert e.value.hint is not None
    assert f"{sha[:7]} (relay: raise subscription limit, batch writes)" in e.value.hint


async def test_too_short_sha_is_explained(repo: AppRepo, app_remote: AppRemote) -> None:
    head = app_remote.commits["head"]
    for prefix in (head[:5], head[:6]):
        with pytest.raises(PermanentError) as e:
            await repo.resolve(prefix)
        assert "at least 7 characters" in str(e.value)
        # the suggestion is the commit, not the prefix typed echoed back ("Did you mean 967385?")
        assert e.value.hint is not None
        assert e.value.hint.startswith(f"Did you mean {head[:7]} (api: add /healthz for the load balancer)")
        assert f"{prefix}?" not in e.value.hint and f"{prefix}," not in e.value.hint


async def test_ambiguous_short_sha_lists_candidates(repo: AppRepo, app_remote: AppRemote) -> None:
    a, b = app_remote.commits["collision-a"], app_remote.commits["collision-b"]
    with pytest.raises(PermanentError) as e:
        await repo.resolve(a[:7])
    msg = str(e.value)
    assert "matches 2 commits" in msg
    assert f"{a[:8]} docs: relay tuning notes (A)" in msg
    assert f"{b[:8]} docs: relay tuning notes (B)" in msg
    assert "more characters" in msg
    # one more character is enough
    assert (await repo.resolve(a[:8])).sha == a


@pytest.mark.parametrize(
    "ref", ["--upload-pack=touch /tmp/x", "main..head", "HEAD@{1}", "a b", "", "x" * 300]
)
async def test_option_like_or_odd_refs_are_refused(repo: AppRepo, ref: str) -> None:
    with pytest.raises(PermanentError, match="is not a commit hash, branch or tag name"):
        await repo.resolve(ref)


async def test_a_commit_pushed_after_the_last_fetch_resolves(repo: AppRepo, app_remote: AppRemote) -> None:
    await repo.resolve("main")  # fetched now; TTL is an hour
    new = push_from_second_clone(app_remote.url, "api/README.md", "api notes\n", "api: notes")
    assert (await repo.resolve("main")).sha == app_remote.commits["head"]  # within the TTL: no fetch
    assert (await repo.resolve(new[:7])).sha == new  # not found -> fetch again
    assert (await repo.resolve("main")).sha == new


async def test_ttl_zero_always_fetches(app_remote: AppRemote, tmp_path: Path) -> None:
    repo = AppRepo(app_remote.url, tmp_path / "m", fetch_ttl=0)
    await repo.resolve("main")
    new = push_from_second_clone(app_remote.url, "README.md", "x\n", "docs: x")
    assert (await repo.resolve("main")).sha == new


async def test_commits_between_newest_first(repo: AppRepo, app_remote: AppRemote) -> None:
    c = app_remote.commits
    commits = await repo.commits_between(c["initial"][:7], c["head"][:7])
    assert [x.sha for x in commits] == [c["head"], c["relay-tune"], c["add-index"], c["api-paginate"]]
    assert await repo.count_between(c["initial"], c["head"]) == 4
    assert await repo.count_between(c["head"], c["initial"]) == 0
    assert await repo.commits_between(c["head"], c["head"]) == []
    assert len(await repo.commits_between(c["initial"], c["head"], limit=2)) == 2


async def test_commits_between_refuses_an_ambiguous_previous_tag(
    repo: AppRepo, app_remote: AppRemote
) -> None:
    with pytest.raises(PermanentError, match="matches 2 commits"):
        await repo.commits_between(app_remote.commits["collision-a"][:7], app_remote.commits["head"])


async def test_commits_between_unknown_sha(repo: AppRepo, app_remote: AppRemote) -> None:
    with pytest.raises(PermanentError, match="is not in divine-funnelcake"):
        await repo.count_between("0000000", app_remote.commits["head"])


async def test_migrations_changed(repo: AppRepo, app_remote: AppRemote) -> None:
    c = app_remote.commits
    mig = "database/migrations/"
    assert await repo.migrations_changed(c["api-paginate"], c["head"]) == [
        f"{mig}000003_add_index.down.sql",
        f"{mig}000003_add_index.up.sql",
    ]
    assert await repo.migrations_changed(c["add-index"], c["head"]) == []
    assert await repo.migrations_changed(c["head"], c["broken"]) == [
        f"{mig}000004_backfill_counts.down.sql",
        f"{mig}000004_backfill_counts.up.sql",
    ]
    assert len(await repo.migrations_changed(None, c["initial"])) == 4
    # going back does not count a removed migration as one to run
    assert await repo.migrations_changed(c["head"], c["initial"]) == []


async def test_is_ancestor(repo: AppRepo, app_remote: AppRemote) -> None:
    c = app_remote.commits
    assert await repo.is_ancestor(c["initial"], c["head"])
    assert not await repo.is_ancestor(c["head"], c["initial"])
    assert not await repo.is_ancestor(c["broken"], c["head"])
    assert await repo.is_ancestor(c["head"][:7], c["broken"][:7])


async def test_mirror_is_reused_and_follows_a_new_url(app_remote: AppRemote, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    await AppRepo(app_remote.url, mirror).resolve("main")
    moved = tmp_path / "moved.git"
    app_remote.path.rename(moved)
    again = AppRepo(moved.as_uri(), mirror)
    assert (await again.resolve("v1.4.0")).sha == app_remote.commits["relay-tune"]
    assert git_out(mirror, "config", "--get", "remote.origin.url") == moved.as_uri()


async def test_unreachable_remote_is_transient(tmp_path: Path) -> None:
    repo = AppRepo("http://127.0.0.1:9/nothing.git", tmp_path / "m")
    with pytest.raises(TransientError, match="could not be reached"):
        await repo.resolve("main")


async def test_https_token_goes_to_the_host_but_never_into_messages_or_config(
    refusing_git_host: RefusingGitHost, tmp_path: Path
) -> None:
    creds = GitCredentials(https_token=SecretStr(TOKEN))
    repo = AppRepo(refusing_git_host.url, tmp_path / "m", credentials=creds)
    with pytest.raises(PermanentError) as e:
        await repo.resolve("main")
    text = f"{e.value} {e.value.message} {e.value.hint} {e.value!r}"
    assert TOKEN not in text
    assert "refused access using the https token in GIT_HTTPS_TOKEN" in text
    # the helper really offered the token
    offered = [base64.b64decode(a.split()[1]).decode() for a in refusing_git_host.authorizations]
    assert f"x-access-token:{TOKEN}" in offered
    config = (tmp_path / "m" / "config").read_text()
    assert TOKEN not in config


async def test_ssh_key_is_used_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake ssh on PATH records how git invokes it, then fails like an unreachable host.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "ssh-args"
    fake = bin_dir / "ssh"
    fake.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\necho "ssh: connect to host: Connection refused" >&2\nexit 255\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    key = tmp_path / "deploy key"
    key.write_text("not a real key\n")
    repo = AppRepo(
        "ssh://git@github.example/divinevideo/divine-funnelcake.git",
        tmp_path / "m",
        credentials=GitCredentials(ssh_key_path=key),
    )
    with pytest.raises(TransientError):
        await repo.resolve("main")
    args = record.read_text().splitlines()
    assert args[args.index("-i") + 1] == str(key)
    assert "IdentitiesOnly=yes" in args
    assert "BatchMode=yes" in args


def test_git_error_text_is_scrubbed(tmp_path: Path) -> None:
    runner = GitRunner(
        tmp_path,
        remote_url="https://example.invalid/x.git",
        credentials=GitCredentials(https_token=SecretStr(TOKEN)),
    )
    runner.run("init", "-q")
    with pytest.raises(PermanentError) as e:
        runner.run("log", TOKEN, what="Looking up")
    assert TOKEN not in str(e.value)
    assert "***" in str(e.value)


def test_urls_lose_their_userinfo() -> None:
    assert display_url("https://user:pw@github.com/a/b.git") == "https://github.com/a/b.git"
    assert (
        scrub("fatal: https://user:pw@github.com/a/b.git failed", [])
        == "fatal: https://***@github.com/a/b.git failed"
    )
    with pytest.raises(PermanentError, match="carries a password"):
        AppRepo("https://user:pw@github.com/a/b.git", Path("/nonexistent"))
