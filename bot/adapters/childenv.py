"""The environment a child process starts with: what it needs to run, and none of the bot's secrets.

git, git-remote-https, ssh and `kubectl kustomize` get an allowlist of the bot's environment (paths,
locale, proxies, CA bundles) plus what their caller adds; nothing else of the bot's reaches them, so a
Slack token, the signing secret, the git token or a DATABASE_URL with its password never sits in
`/proc/<pid>/environ` of a child. The kubeconfig's exec plugin (gke-gcloud-auth-plugin) is the one
exception that needs the caller's own settings (gcloud's CLOUDSDK_*, GOOGLE_*): it gets the environment
without the variables named in `SECRET_VARS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping

# The bot's settings that hold secrets (bot/settings.py reads them from these variables).
SECRET_VARS = frozenset(
    {"SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET", "GIT_HTTPS_TOKEN", "DATABASE_URL"}
)

# What a command-line tool needs from its parent to find itself, its files, the network and the CAs.
_PASSED = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "GIT_SSL_CAINFO",  # a private CA for the git host, set by the operator
        "GIT_SSL_CAPATH",
        "SSH_AUTH_SOCK",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)


def child_env(
    extra: Mapping[str, str] | None = None, *, parent: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The allowlisted part of `parent` (the process environment) and `extra`, which wins."""
    source = os.environ if parent is None else parent
    env = {k: v for k, v in source.items() if k in _PASSED or k.startswith("LC_")}
    env |= dict(extra or {})
    return env


def plugin_env(
    extra: Mapping[str, str] | None = None, *, parent: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`parent` without the bot's secrets, and `extra`: a credential plugin reads its own settings."""
    source = os.environ if parent is None else parent
    env = {k: v for k, v in source.items() if k not in SECRET_VARS}
    env |= dict(extra or {})
    return env


async def communicate(proc: asyncio.subprocess.Process, limit: float) -> tuple[bytes, bytes]:
    """`proc`'s stdout and stderr within `limit` seconds. On a timeout (TimeoutError) or a cancel the process
    is killed and reaped before the exception goes on: no child outlives the call that started it."""
    try:
        async with asyncio.timeout(limit):
            return await proc.communicate()
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
