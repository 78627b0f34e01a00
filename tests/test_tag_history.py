"""The overlay's own git history: where a rollback goes when the env was only ever changed by hand."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from bot.adapters.gitops import GitOpsRepo
from bot.settings import FunnelcakeConfig, Service
from tests.testbed.gitrepos import GitOpsRemote, overlay_path, push_from_second_clone


async def test_tag_history_lists_hand_edits_newest_first(
    gitops_remote: GitOpsRemote, git_config: FunnelcakeConfig, tmp_path: Path
) -> None:
    repo = GitOpsRepo(gitops_remote.url, tmp_path / "clone", branch=gitops_remote.branch)
    staging = git_config.env("staging")
    seeded = gitops_remote.tags["staging"]
    for tag in ("1111111", "2222222"):
        await asyncio.to_thread(
            push_from_second_clone,
            gitops_remote.url,
            overlay_path("api", "staging"),
            lambda text, tag=tag: re.sub(r"(newTag:\s*['\"]?)[0-9a-f]{7}", rf"\g<1>{tag}", text),
            f"staging by hand to {tag}",
        )
    assert await repo.tag_history(staging, Service.API) == ["2222222", "1111111", seeded]
    assert await repo.tag_history(staging, Service.API, limit=2) == ["2222222", "1111111"]
