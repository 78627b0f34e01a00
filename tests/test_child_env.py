"""Child processes start without the bot's secrets: git (and git-remote-http under it) and the CLI's log.

The git test runs a real `git ls-remote` against an HTTP server of the test that asks for Basic auth:
the token must reach the server, and must not be in the environment of any git process, read from
`/proc/<pid>/environ` while they wait on the server.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from pydantic import SecretStr

from bot import cli
from bot.adapters.childenv import child_env, plugin_env
from bot.adapters.gitutil import GitCredentials, GitRunner, run_blocking
from bot.errors import PermanentError
from bot.logs import forget_secrets
from bot.settings import Settings

GIT_TOKEN = "ghp_ChildEnvPlantedToken0123456789abcdef"
DB_PASSWORD = "ChildEnvPlantedDbPassword"
PLANTED = {
    "SLACK_BOT_TOKEN": "xoxb-1111111111-2222222222-ChildEnvPlantedBotToken",
    "SLACK_SIGNING_SECRET": "child-env-planted-signing-secret-0123456789",
    "DATABASE_URL": f"postgresql+asyncpg://bot:{DB_PASSWORD}@db:5432/ledger",
    "GIT_HTTPS_TOKEN": GIT_TOKEN,
}


class _AuthGate:
    """Answers /repo.git/info/refs with 401 until it gets credentials, then holds the request open."""

    def __init__(self) -> None:
        self.authorization: list[str] = []
        self.holding = asyncio.Event()
        self.release = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def refs(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        if auth is None:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="git"'})
        self.authorization.append(auth)
        self.holding.set()
        await self.release.wait()
        return web.Response(status=403, text="no repository for you")

    async def __aenter__(self) -> _AuthGate:
        app = web.Application()
        app.router.add_get("/repo.git/info/refs", self.refs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/repo.git"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def gate() -> AsyncIterator[_AuthGate]:
    async with _AuthGate() as g:
        yield g


def _descendants(root: int) -> dict[int, str]:
    """pid → command name of every process below `root`."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents[int(entry.name)], names[int(entry.name)] = ppid, name
    found: dict[int, str] = {}
    for pid in parents:
        p = pid
        while p in parents and p not in (0, 1):
            p = parents[p]
            if p == root:
                found[pid] = names[pid]
                break
    return found


def _environs_below(root: int) -> tuple[dict[int, str], dict[int, str]]:
    """The processes below `root` and the environment of each that is still there."""
    children = _descendants(root)
    environs: dict[int, str] = {}
    for pid in children:
        try:
            environs[pid] = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue  # it ended meanwhile (the credential helper's shell)
    return children, environs


async def test_git_and_its_helpers_run_without_the_bots_secrets(
    gate: _AuthGate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    runner = GitRunner(
        tmp_path / "clone", remote_url=gate.url, credentials=GitCredentials(https_token=SecretStr(GIT_TOKEN))
    )
    call = asyncio.create_task(
        run_blocking(runner.run, "ls-remote", gate.url, "HEAD"), name="test-git-ls-remote"
    )
    await asyncio.wait_for(gate.holding.wait(), 30)
    children, environs = await asyncio.to_thread(_environs_below, os.getpid())
    assert "git" in children.values(), children
    assert any(n.startswith("git-remote-http") for n in children.values()), children
    for pid, environ in environs.items():
        name = children[pid]
        for var, value in PLANTED.items():
            assert value not in environ, f"{name} ({pid}) holds {var}'s value in its environment"
            assert f"{var}=" not in environ, f"{name} ({pid}) inherited {var}"
    # the token did reach the server, through the credential helper
    assert gate.authorization == [
        "Basic " + base64.b64encode(f"x-access-token:{GIT_TOKEN}".encode()).decode()
    ]
    gate.release.set()
    with pytest.raises(PermanentError) as refused:
        await asyncio.wait_for(call, 30)
    assert GIT_TOKEN not in str(refused.value)


def test_the_credential_file_is_private_and_goes_with_its_runner(tmp_path: Path) -> None:
    runner = GitRunner(
        tmp_path,
        remote_url="https://example.invalid/x.git",
        credentials=GitCredentials(https_token=SecretStr(GIT_TOKEN)),
    )
    path = Path(runner._env["FUNNELCAKE_GIT_CREDENTIALS"])
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert GIT_TOKEN not in "".join(runner._env.values())
    del runner
    assert not path.exists() and not path.parent.exists()


def test_kubectl_and_git_get_only_what_they_need_and_the_plugin_keeps_gclouds_settings() -> None:
    parent = {
        **PLANTED,
        "PATH": "/usr/bin",
        "HOME": "/home/bot",
        "LC_ALL": "C.UTF-8",
        "HTTPS_PROXY": "http://proxy:3128",
        "CLOUDSDK_CORE_PROJECT": "dv-platform-prod",
        "SOMETHING_ELSE": "x",
    }
    env = child_env({"GIT_TERMINAL_PROMPT": "0"}, parent=parent)
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/home/bot",
        "LC_ALL": "C.UTF-8",
        "HTTPS_PROXY": "http://proxy:3128",
        "GIT_TERMINAL_PROMPT": "0",
    }
    plugin = plugin_env({"KUBERNETES_EXEC_INFO": "{}"}, parent=parent)
    assert plugin["CLOUDSDK_CORE_PROJECT"] == "dv-platform-prod"
    assert not set(PLANTED) & set(plugin)


def test_the_cli_log_file_is_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in PLANTED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORK_DIR", str(tmp_path))
    root = logging.getLogger()
    level = root.level
    handler, path = cli._setup_logging(Settings())
    try:
        assert path is not None
        log = logging.getLogger("bot.test")
        try:
            raise RuntimeError(f"push failed with {GIT_TOKEN} and {PLANTED['DATABASE_URL']}")
        except RuntimeError:
            log.exception("internal error talking to Slack with %s", PLANTED["SLACK_BOT_TOKEN"])
        handler.flush()
        written = path.read_text()
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)
        forget_secrets()
    assert "internal error talking to Slack" in written and "Traceback" in written
    for var, value in PLANTED.items():
        secret = DB_PASSWORD if var == "DATABASE_URL" else value
        assert secret not in written, f"{var}'s value is in {path}"
