"""The git adapters in one import: the app repo mirror, the GitOps clone, and their credentials."""

from __future__ import annotations

from bot.adapters.apprepo import AppRepo, Commit
from bot.adapters.gitops import BumpResult, GitOpsRepo, commit_message, read_image_tag, set_image_tag
from bot.adapters.gitutil import GitCredentials

__all__ = [
    "AppRepo",
    "BumpResult",
    "Commit",
    "GitCredentials",
    "GitOpsRepo",
    "commit_message",
    "read_image_tag",
    "set_image_tag",
]
