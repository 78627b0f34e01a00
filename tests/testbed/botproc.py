"""The bot as a real process (`python -m bot`, Socket Mode or HTTP mode) against the sandbox and the local Slack.

Crash tests need what only a process gives: SIGKILL with no cleanup at all. `BotProcess` works outside
pytest too (`async with BotProcess(sandbox, slack, name="a") as bot: ...`); its output goes to a log
file in the sandbox (a pipe nobody reads would fill and stall the bot), and `tail()` shows it.

In HTTP mode (`mode="http"`) each replica listens on its own port, so a test chooses which replica a
request reaches (`await bot.deliver(*slack.signed_click(...))`), as a load balancer in front of two pods
would; in Socket Mode Slack picks the connection.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import IO, Any, Literal

import aiohttp

from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import APP_TOKEN, BOT_TOKEN, FakeSlack

__all__ = ["BotProcess", "free_port"]

STOP_GRACE = 40.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BotProcess:
    """One `python -m bot` process; several may share a ledger (`database_url`) to play replicas."""

    def __init__(
        self,
        sandbox: Sandbox,
        slack: FakeSlack,
        *,
        name: str = "bot",
        database_url: str | None = None,
        # 4 s, not less: on a loaded machine a heartbeat can slip past a 2 s lease, and the bot then
        # rightly stops and recovers its own deploy, which shows as an extra sync in the audit trail
        lease_ttl: float = 4.0,
        recovery_every: float = 0.5,
        extra_env: dict[str, str] | None = None,
        mode: Literal["socket", "http"] = "socket",
    ) -> None:
        self.sandbox = sandbox
        self.slack = slack
        self.name = name
        self.database_url = database_url or f"sqlite+aiosqlite:///{sandbox.root / 'proc-ledger.db'}"
        self.lease_ttl = lease_ttl
        self.recovery_every = recovery_every
        self.extra_env = extra_env or {}
        self.mode = mode
        self.port = free_port()
        self.log_path = sandbox.root / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/root"),
            "SLACK_BOT_TOKEN": BOT_TOKEN,
            "SLACK_APP_TOKEN": APP_TOKEN,
            "SLACK_API_URL": self.slack.api_url,
            "SLACK_MODE": self.mode,
            "SLACK_SIGNING_SECRET": self.slack.signing_secret,
            "FUNNELCAKE_CONFIG": str(self.sandbox.config_path),
            "KUBECONFIG": str(self.sandbox.kubeconfig_path),
            "DATABASE_URL": self.database_url,
            # Each replica has its own checkouts, as separate pods would.
            "WORK_DIR": str(self.sandbox.root / f"{self.name}-work"),
            "HTTP_HOST": "127.0.0.1",
            "HTTP_PORT": str(self.port),
            "LEASE_TTL": str(self.lease_ttl),
            "RECOVERY_EVERY": str(self.recovery_every),
            "LOG_FORMAT": "text",
            **self.extra_env,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, connected_timeout: float = 60.0) -> None:
        """Start the process and wait until it can take Slack's requests: one more live Socket Mode
        connection, or (HTTP mode) its listener answering."""
        before = self.slack.socket_connections
        self._log = Path(self.log_path).open("ab")  # noqa: ASYNC230, SIM115 - held for the process's life
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", env=self.env(), stdout=self._log, stderr=asyncio.subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(connected_timeout):
                while not await self._up(before):
                    if self.proc.returncode is not None:
                        raise RuntimeError(
                            f"bot {self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                        )
                    await asyncio.sleep(0.1)
        except TimeoutError:
            await self.kill()
            raise TimeoutError(f"bot {self.name} did not come up:\n{self.tail()}") from None

    async def _up(self, sockets_before: int) -> bool:
        if self.mode == "socket":
            return self.slack.socket_connections > sockets_before
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(f"{self.url}/healthz") as resp,
            ):
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def deliver(self, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        """POST a signed Slack request (`slack.signed_click(...)`, `slack.signed_slash_command(...)`) to this
        replica's /slack/events and return the HTTP status and body it answered within Slack's 3 s."""
        assert self.mode == "http", "deliver() is for HTTP mode; in Socket Mode use slack.click()"
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.post(f"{self.url}/slack/events", data=body, headers=headers) as resp,
        ):
            return resp.status, await resp.text()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL: no finally blocks, no lease release, no last Slack write — a crash."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._close_log()

    async def stop(self, grace: float = STOP_GRACE) -> int | None:
        """SIGTERM and wait for a graceful exit; SIGKILL after `grace` seconds."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), grace)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def __aenter__(self) -> BotProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
