"""Running git for the adapters: credentials through the environment, timeouts, scrubbed errors.

Every call here blocks; the adapters run them with `run_blocking` so the event loop never waits on
git, and so a cancelled deploy never leaves a git process working on a clone behind its lock.

Retries: none here. A network failure is a TransientError, and the engine retries the step that ran git
(resolve, gitops) within its budget; each clone, fetch and push is bounded by `timeouts.git`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import tempfile
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr

from bot.adapters.childenv import child_env
from bot.budgets import DEFAULT_TIMEOUTS
from bot.errors import BotError, PermanentError, TransientError

if TYPE_CHECKING:
    from bot.settings import Settings

T = TypeVar("T")

NETWORK_TIMEOUT = DEFAULT_TIMEOUTS.git  # clone/fetch/push: `timeouts.git` in the environments file
LOCAL_TIMEOUT = 30.0  # log, diff, commit, rebase on a local clone

# The token reaches git only through a file readable by the bot alone, which the inline credential
# helper below prints; it never appears on a command line, in a URL, in .git/config or in the
# environment of git or its children (where /proc/<pid>/environ would show it).
_TOKEN_FILE_VAR = "FUNNELCAKE_GIT_CREDENTIALS"  # noqa: S105 - the variable's name, not a token
# A fixed script (no user input reaches it): git runs it through sh as `<helper> get|store|erase`.
_CREDENTIAL_HELPER = f'!f() {{ test "$1" = get || exit 0; cat "${{{_TOKEN_FILE_VAR}}}"; }}; f'

_TIMED_OUT = "timed out"  # the stderr of a git call this module killed

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

    def env(self, token_file: Path | None = None) -> dict[str, str]:
        """What git needs to authenticate; `token_file` holds the https credential (see `write_token`)."""
        out: dict[str, str] = {}
        if self.ssh_key_path is not None:
            # IdentitiesOnly: use this key and no agent key; BatchMode: fail instead of prompting.
            out["GIT_SSH_COMMAND"] = (
                f"ssh -i {shlex.quote(str(self.ssh_key_path))} -o IdentitiesOnly=yes"
                " -o BatchMode=yes -o ConnectTimeout=20"
            )
        if self.https_token is not None and token_file is not None:
            # An empty helper value first resets any helper from the system or user config.
            out |= {
                "GIT_CONFIG_COUNT": "2",
                "GIT_CONFIG_KEY_0": "credential.helper",
                "GIT_CONFIG_VALUE_0": "",
                "GIT_CONFIG_KEY_1": "credential.helper",
                "GIT_CONFIG_VALUE_1": _CREDENTIAL_HELPER,
                _TOKEN_FILE_VAR: str(token_file),
            }
        return out

    def write_token(self) -> Path | None:
        """The https credential in a new 0600 file of a 0700 directory, or None without a token.

        GitRunner removes it (and its directory) when the runner is garbage-collected."""
        if self.https_token is None:
            return None
        try:
            folder = Path(tempfile.mkdtemp(prefix="funnelcake-git-"))
            path = folder / "credential"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"username={self.https_username}\npassword={self.https_token.get_secret_value()}\n")
        except OSError as e:
            raise PermanentError(
                f"cannot write git's credential file in {tempfile.gettempdir()}: {e.strerror or e}",
                hint="Give the bot a writable temporary directory (TMPDIR; deploy/ mounts an emptyDir on /tmp).",
            ) from None
        return path

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
        token_file = credentials.write_token() if credentials is not None else None
        if token_file is not None:
            weakref.finalize(self, _remove_token, token_file)
        if credentials is not None:
            env |= credentials.env(token_file)
        if identity is not None:
            name, email = identity
            env |= {
                "GIT_AUTHOR_NAME": name,
                "GIT_AUTHOR_EMAIL": email,
                "GIT_COMMITTER_NAME": name,
                "GIT_COMMITTER_EMAIL": email,
            }
        self._env = child_env(env)
        self._secrets = credentials.secrets() if credentials is not None else []

    def scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def run(
        self, *args: str, timeout: float = LOCAL_TIMEOUT, check: bool = True, what: str | None = None
    ) -> GitResult:
        """Run `git <args>`; with check, a failure raises a BotError naming `what` was attempted."""
        self.cwd.mkdir(parents=True, exist_ok=True)
        try:
            # its own process group: on a timeout ssh and git-remote-https die with git
            proc = subprocess.Popen(
                ["git", *args],
                cwd=self.cwd,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except FileNotFoundError as e:
            raise PermanentError(
                "git is not installed or not on PATH.", hint="Install git in the bot's image."
            ) from e
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            result = GitResult(-9, "", f"{_TIMED_OUT} after {timeout:g}s")
            if check:
                raise self.failure(what or f"git {args[0]}", result, timeout=timeout) from None
            return result
        result = GitResult(
            proc.returncode,
            self.scrub(_text(out)),
            self.scrub(_text(err)),
        )
        if check and not result.ok:
            raise self.failure(what or f"git {args[0]}", result, timeout=timeout)
        return result

    def failure(self, what: str, result: GitResult, *, timeout: float | None = None) -> BotError:
        """Translate a failed git call into a transient or permanent error a person can act on."""
        detail = _tail(result.text)
        low = result.text.lower()
        if result.stderr.startswith(_TIMED_OUT):
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


def _text(raw: bytes) -> str:
    """git's output as text, without its one final newline (as callers compare and split it)."""
    text = raw.decode("utf-8", "replace")
    return text[:-1] if text.endswith("\n") else text


def _remove_token(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
        path.parent.rmdir()


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
