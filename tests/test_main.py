"""The real process: `python -m bot` in Socket Mode against the sandbox and the local Slack."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import APP_TOKEN, BOT_TOKEN, FakeSlack


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_missing_tokens_give_one_clear_message() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        env={"PATH": os.environ["PATH"], "SLACK_MODE": "socket"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    text = err.decode()
    assert "SLACK_BOT_TOKEN" in text
    assert "SLACK_APP_TOKEN" in text
    assert "Traceback" not in text


async def test_socket_mode_process_answers_status_and_stops_on_sigterm(
    sandbox: Sandbox, slack_sandbox: FakeSlack
) -> None:
    port = _free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_APP_TOKEN": APP_TOKEN,
        "SLACK_API_URL": slack_sandbox.api_url,
        "SLACK_MODE": "socket",
        "FUNNELCAKE_CONFIG": str(sandbox.config_path),
        "KUBECONFIG": str(sandbox.kubeconfig_path),
        "DATABASE_URL": f"sqlite+aiosqlite:///{sandbox.root / 'proc-ledger.db'}",
        "WORK_DIR": str(sandbox.root / "proc-work"),
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(port),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        await slack_sandbox.wait_connected(timeout=60)
        ack = await slack_sandbox.send_slash("status")
        assert "Working on it" in str(ack.get("payload", ack))
        async with asyncio.timeout(60):
            while not slack_sandbox.calls_to("chat.postMessage"):
                await asyncio.sleep(0.2)
        status = slack_sandbox.calls_to("chat.postMessage")[0]
        text = str(status.params.get("blocks"))
        for env_name in ("production", "staging", "poc"):
            assert f"*{env_name}*" in text
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 40)
        assert proc.returncode == 0, out.decode()[-2000:]
        assert b"Traceback" not in out, out.decode()[-3000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
