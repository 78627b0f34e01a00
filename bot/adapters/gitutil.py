"""Running git for the adapters: credentials through the environment, timeouts, scrubbed errors.

Every call here blocks; the adapters run them with `run_blocking` so the event loop never waits on
git, and so a cancelled deploy never leaves a git process working on a clone behind its lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit, urlunsplit

import git
from pydantic import SecretStr

from bot.errors import BotError, PermanentError, TransientError

if TYPE_CHECKING:
    from bot.settings import Settings

T = TypeVar("T")

NETWORK_TIMEOUT = 120.0  # clone/fetch/push: a big first clone on a slow link, not a hung ssh
LOCAL_TIMEOUT = 30.0  # log, diff, commit, rebase on a local clone

# The token reaches git only through this variable, read by the inline credential helper below;
# it never appears on a command line, in a URL or in .git/config.
_TOKEN_VAR = "FUNNELCAKE_GIT_TOKEN"  # noqa: S105 - the variable's name, not a token
_USER_VAR = "FUNNELCAKE_GIT_USERNAME"
# A fixed script (no user input reaches it): git runs it through sh as `<helper> get|store|erase`.
_CREDENTIAL_HELPER = f'!f() {{ test "$1" = get || exit 0; echo "username=${{{_USER_VAR}}}"; echo "password=${{{_TOKEN_VAR}}}"; }}; f'

_HEX_RE = re.compile(r"^[0-9a-fA-F]{7,40}$")
_USERINFO_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)

_TRANSIENT_MARKERS = (
    "could not resolve host",
    "connection refused",
    "connection timed out",
    "operation timed out",
    "failed to connect",
    "connection reset",
    "early eof",
    "the remote end hung up unexpectedly",
    "temporary failure in name resolution",
    "returned error: 500",
    "returned error: 502",
    "returned error: 503",
    "returned error: 504",
    "returned error: 429",
    "rpc failed",
    "network is unreachable",
)
_AUTH_MARKERS = (
    "authentication failed",
    "permission denied",
    "could not read username",
    "could not read password",
    "invalid username or password",
    "returned error: 401",
    "returned error: 403",
    "host key verification failed",
    "repository not found",
    "does not appear to be a git repository",
)


@dataclass(frozen=True)
class GitCredentials:
    """How git authenticates to the remotes: an ssh key file, or an https token (a SecretStr)."""

    ssh_key_path: Path | None = None
    https_token: SecretStr | None = None
    https_username: str = "x-access-token"  # what GitHub expects with an app or fine-grained token

    @classmethod
    def from_settings(cls, settings: Settings) -> GitCredentials | None:
        if settings.git_ssh_key_path is None and settings.git_https_token is None:
            return None
        return cls(ssh_key_path=settings.git_ssh_key_path, https_token=settings.git_https_token)

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.ssh_key_path is not None:
            # IdentitiesOnly: use this key and no agent key; BatchMode: fail instead of prompting.
            out["GIT_SSH_COMMAND"] = (
                f"ssh -i {shlex.quote(str(self.ssh_key_path))} -o IdentitiesOnly=yes"
                " -o BatchMode=yes -o ConnectTimeout=20"
            )
        if self.https_token is not None:
            # An empty helper value first resets any helper from the system or user config.
            out |= {
                "GIT_CONFIG_COUNT": "2",
                "GIT_CONFIG_KEY_0": "credential.helper",
                "GIT_CONFIG_VALUE_0": "",
                "GIT_CONFIG_KEY_1": "credential.helper",
                "GIT_CONFIG_VALUE_1": _CREDENTIAL_HELPER,
                _TOKEN_VAR: self.https_token.get_secret_value(),
                _USER_VAR: self.https_username,
            }
        return out

    def secrets(self) -> list[str]:
        return [self.https_token.get_secret_value()] if self.https_token is not None else []

    def describe(self) -> str:
        parts = []
        if self.ssh_key_path is not None:
            parts.append(f"the ssh key {self.ssh_key_path} (GIT_SSH_KEY_PATH)")
        if self.https_token is not None:
            parts.append("the https token in GIT_HTTPS_TOKEN")
        return " and ".join(parts) or "no credentials"


def display_url(url: str) -> str:
    """The URL without any user:password part, fit for messages and logs."""
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        if parts.scheme and "@" in parts.netloc:
            host = parts.netloc.rsplit("@", 1)[1]
            return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def reject_inline_password(url: str) -> None:
    """A token belongs in GIT_HTTPS_TOKEN: a URL with a password would be written to .git/config."""
    with contextlib.suppress(ValueError):
        if urlsplit(url).password:
            raise PermanentError(
                f"The git URL {display_url(url)} carries a password.",
                hint="Remove it from the URL and set GIT_HTTPS_TOKEN instead.",
            )


def scrub(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return _USERINFO_RE.sub(r"\g<scheme>***@", text)


def is_hex_ref(ref: str) -> bool:
    return bool(_HEX_RE.match(ref))


@dataclass(frozen=True)
class GitResult:
    status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def text(self) -> str:
        return f"{self.stdout}\n{self.stderr}".strip()


class GitRunner:
    """Runs git in one directory with the credentials' environment and a timeout on every call."""

    def __init__(
        self,
        cwd: Path,
        *,
        remote_url: str,
        credentials: GitCredentials | None = None,
        identity: tuple[str, str] | None = None,
    ) -> None:
        self.cwd = cwd
        self.remote = display_url(remote_url)
        self.credentials = credentials
        env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "", "SSH_ASKPASS": ""}
        if credentials is not None:
            env |= credentials.env()
        if identity is not None:
            name, email = identity
            env |= {
                "GIT_AUTHOR_NAME": name,
                "GIT_AUTHOR_EMAIL": email,
                "GIT_COMMITTER_NAME": name,
                "GIT_COMMITTER_EMAIL": email,
            }
        self._env = env
        self._secrets = credentials.secrets() if credentials is not None else []

    def scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def run(
        self, *args: str, timeout: float = LOCAL_TIMEOUT, check: bool = True, what: str | None = None
    ) -> GitResult:
        """Run `git <args>`; with check, a failure raises a BotError naming `what` was attempted."""
        self.cwd.mkdir(parents=True, exist_ok=True)
        runner = git.Git(str(self.cwd))
        try:
            status, out, err = runner.execute(
                ["git", *args],
                env=self._env,
                kill_after_timeout=timeout,
                with_extended_output=True,
                with_exceptions=False,
            )
        except git.GitCommandNotFound as e:
            raise PermanentError(
                "git is not installed or not on PATH.", hint="Install git in the bot's image."
            ) from e
        result = GitResult(int(status), self.scrub(str(out)), self.scrub(str(err)))
        if check and not result.ok:
            raise self.failure(what or f"git {args[0]}", result, timeout=timeout)
        return result

    def failure(self, what: str, result: GitResult, *, timeout: float | None = None) -> BotError:
        """Translate a failed git call into a transient or permanent error a person can act on."""
        detail = _tail(result.text)
        low = result.text.lower()
        if result.stderr.startswith("Timeout: the command"):
            return TransientError(
                f"{what} timed out after {timeout:g}s talking to {self.remote}.",
                hint="The git host may be slow or unreachable; the step can be retried.",
            )
        if any(m in low for m in _AUTH_MARKERS):
            who = self.credentials.describe() if self.credentials is not None else "no credentials"
            return PermanentError(
                f"{what} failed: {self.remote} refused access using {who}. git said: {detail}",
                hint="Check that the credential is valid and has access to the repository.",
            )
        if any(m in low for m in _TRANSIENT_MARKERS):
            return TransientError(
                f"{what} failed: {self.remote} could not be reached. git said: {detail}",
                hint="The step can be retried.",
            )
        return PermanentError(f"{what} failed. git said: {detail}")


def _tail(text: str, limit: int = 600) -> str:
    """The useful end of git's output, on one line, short enough for a Slack message."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("hint:")]
    joined = " | ".join(lines)
    return joined if len(joined) <= limit else "…" + joined[-limit:]


async def run_blocking(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking git operation in a thread; if we are cancelled, wait for it before re-raising.

    A thread cannot be interrupted: returning early would let the caller release the clone's lock
    (or reset the clone) while git is still writing to it.
    """
    name = getattr(fn, "__qualname__", "git")
    fut = asyncio.get_running_loop().create_task(asyncio.to_thread(fn, *args), name=f"git:{name}")
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await fut
        raise
