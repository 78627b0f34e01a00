"""A real Nostr relay per sandbox env: the `nostr-relay` package from PyPI, one process each, SQLite storage.

Nobody here wrote the relay: NIP-11, NIP-01 (REQ → EVENT… → EOSE, CLOSE), its rate limiter and its
NOTICEs are the package's own. The one thing the test bed adds is the *version* in the relay's NIP-11
document: the package advertises its own release ("1.14"), while funnelcake's relay advertises the commit
it was built from. So `python -m tests.testbed.relay CONFIG VERSION_FILE` runs the package's own `serve`
command (alembic upgrade, then uvicorn) after setting the module-level version the NIP-11 handler reads
to the contents of VERSION_FILE, and re-reads that file on SIGHUP. The sandbox writes the relay
Deployment's image tag there and sends SIGHUP when a simulated rollout changes the image — as if the
Service now routed to the new pods — with no restart, so a relay is never down while a deploy verifies.

Faults are the relay's own behaviour, configured and applied by a restart on the same port:
- "ws-refused": the relay's rate limiter allows one websocket per hour (`ACCEPT: 1/hour`); the sandbox
  spends that one itself, so every later websocket handshake is refused while HTTP and NIP-11 still answer.
- "notice": likewise one REQ per hour; every later REQ gets `["NOTICE","rate-limited"]` and never EOSE.
- `pin_version()`: the relay keeps advertising the version it had (the new pods never took traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Literal

import aiohttp
import yaml

__all__ = ["Fault", "NostrRelay"]

Fault = Literal["ws-refused", "notice"]

_LIMITS: dict[str, dict[str, dict[str, str]]] = {
    "ws-refused": {"ip": {"ACCEPT": "1/hour"}},
    "notice": {"ip": {"REQ": "1/hour"}},
}


_REPO = Path(__file__).resolve().parents[2]  # `python -m tests.testbed.relay` imports from here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _PortTaken(Exception):
    """Between choosing a free port and the relay binding it, another process took it."""


class NostrRelay:
    """One `nostr-relay` process on 127.0.0.1; `advertise(tag)` changes its NIP-11 version in place."""

    def __init__(self, root: Path, env: str, version: str) -> None:
        self.root = root
        self.env = env
        self.version = version
        self.port = _free_port()
        self.fault: Fault | None = None
        self.pinned = False
        self.config_path = root / f"relay-{env}.yaml"
        self.version_path = root / f"relay-{env}.version"
        self.log_path = root / f"relay-{env}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "relay_name": f"funnelcake {self.env} (test bed)",
            "relay_description": f"nostr-relay from PyPI playing funnelcake-relay in {self.env}",
            "storage": {
                "sqlalchemy.url": f"sqlite+aiosqlite:///{self.root / f'relay-{self.env}.sqlite3'}",
                "num_concurrent_reqs": 4,
                "num_concurrent_adds": 1,
            },
            "gunicorn": {"bind": f"127.0.0.1:{self.port}", "workers": 1, "loglevel": "warning"},
            "verification": {"nip05_verification": "disabled"},
            "logging": {
                "version": 1,
                "handlers": {"console": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout"}},
                "root": {"level": "WARNING", "handlers": ["console"]},
            },
        }
        if self.fault is not None:
            config["rate_limits"] = _LIMITS[self.fault]
        return config

    async def start(self, *, within: float = 60.0) -> None:
        """Start on a free port; if another process took that port first, start again on another one."""
        for attempt in range(3):
            try:
                await self._start(within)
                return
            except _PortTaken:
                if attempt == 2:
                    raise
                self.port = _free_port()

    async def _start(self, within: float) -> None:
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.config_path.write_text(yaml.safe_dump(self._config()))
        self.version_path.write_text(self.version)
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.testbed.relay",
            str(self.config_path),
            str(self.version_path),
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.root,
            env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
            | {"PYTHONPATH": str(_REPO)},
        )
        try:
            async with asyncio.timeout(within):
                while not await self._answers():
                    if self.proc.returncode is not None:
                        await self.stop()
                        if (
                            "address already in use"
                            in self.log_path.read_text(errors="replace")[logged:].lower()
                        ):
                            raise _PortTaken(self.port)
                        raise RuntimeError(f"relay {self.env} exited {self.proc.returncode}:\n{self.tail()}")
                    await asyncio.sleep(0.1)
        except TimeoutError:
            await self.stop()
            raise TimeoutError(f"relay {self.env} did not come up:\n{self.tail()}") from None
        if self.fault is not None:
            await self._spend_allowance()

    async def _answers(self) -> bool:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(self.http_url, headers={"Accept": "application/nostr+json"}) as resp,
            ):
                doc = await resp.json(content_type=None)
                return resp.status == 200 and isinstance(doc, dict) and doc.get("version") == self.version
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    async def _spend_allowance(self) -> None:
        """Use the one websocket / REQ the fault's rate limit allows, so the bot's are the refused ones."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.ws_connect(self.ws_url) as ws,
        ):
            await ws.send_str(json.dumps(["REQ", "testbed-spend", {"limit": 1}]))
            while True:
                msg = json.loads(await ws.receive_str())
                if msg[0] == "EOSE":
                    break
            await ws.send_str(json.dumps(["CLOSE", "testbed-spend"]))

    def advertise(self, version: str) -> None:
        """What a rollout does: the relay answering on this URL now reports `version` (SIGHUP, no restart)."""
        if self.pinned or version == self.version:
            return
        self.version = version
        self.version_path.write_text(version)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGHUP)

    def pin_version(self) -> None:
        """From now on rollouts do not reach this relay: NIP-11 keeps the version it shows."""
        self.pinned = True

    async def set_fault(self, fault: Fault | None) -> None:
        """Reconfigure the relay (a restart on the same port, as a config change rolls a pod)."""
        await self.stop()
        self.fault = fault
        await self._start(60.0)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _exit_with_parent(parent: int) -> None:
    """A test run that dies without stopping its sandbox must not leave relays listening behind it."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _serve(config_path: str, version_path: str) -> None:
    """The relay process: the package's own `serve`, with NIP-11's version read from VERSION_FILE."""
    # only the relay process imports the package: its cli module installs uvloop as it is imported
    from nostr_relay import cli, web  # noqa: PLC0415

    def advertise(*_: object) -> None:
        with contextlib.suppress(OSError):
            web.__version__ = Path(version_path).read_text().strip()  # type: ignore[attr-defined]

    advertise()
    signal.signal(signal.SIGHUP, advertise)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="orphan-watch").start()
    cli.main(["-c", config_path, "serve", "--use-uvicorn"], standalone_mode=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
