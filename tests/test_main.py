"""The real process: `python -m bot` in Socket Mode against the sandbox and the local Slack; its probes and metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from datetime import UTC, datetime, timedelta

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bot.ledger import DeployState, Ledger, StepState
from tests.testbed.botproc import BotProcess
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


async def test_bad_settings_are_refused_without_echoing_a_secret() -> None:
    mistake = "xoxb-2222-3333-pasted-into-the-wrong-variable"
    base = {
        "PATH": os.environ["PATH"],
        "SLACK_BOT_TOKEN": "xoxb-1-2-bot",
        "SLACK_APP_TOKEN": "xapp-1-A-2-app",
    }
    for extra, says in (({"SLACK_MODE": mistake}, "SLACK_MODE"), ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            env=base | extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        text = err.decode()
        assert proc.returncode == 2, text
        assert says in text
        assert mistake not in text
        assert "Traceback" not in text


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status, await resp.text()


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
        "LOG_FORMAT": "json",
    }
    base = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        await slack_sandbox.wait_connected(timeout=60)
        session = aiohttp.ClientSession()
        try:
            assert await _get(session, f"{base}/healthz") == (200, '{"status": "alive"}')
            # Socket Mode is up and the ledger answers: ready
            status, body = await _get(session, f"{base}/readyz")
            assert (status, body) == (200, '{"status": "ready"}'), body
            status, metrics = await _get(session, f"{base}/metrics")
            assert status == 200
            # every family is there before the first deploy, each env's series at zero
            for env_name in ("production", "staging", "poc"):
                assert (
                    f'funnelcake_bot_deploys_total{{env="{env_name}",kind="rollback",result="succeeded"}} 0.0'
                    in metrics
                )
                assert f'locks_held{{env="{env_name}"}} 0.0' in metrics
            assert "# TYPE funnelcake_bot_step_duration_seconds histogram" in metrics
            assert "# TYPE funnelcake_bot_slack_api_errors_total counter" in metrics
            families = {f.name: f for f in text_string_to_metric_families(metrics)}
            # one prefix on every family, the documented labels, and no `_created` series
            assert all(name.startswith("funnelcake_bot_") for name in families), sorted(families)
            assert "_created" not in metrics
            labels = {
                "funnelcake_bot_deploys": {"env", "result", "kind"},
                "funnelcake_bot_locks_held": {"env"},
                "funnelcake_bot_last_successful_deploy_timestamp_seconds": {"env"},
            }
            for name, expected in labels.items():
                samples = families[name].samples
                assert samples and all(set(s.labels) == expected for s in samples), (name, samples)
            for name in (
                "funnelcake_bot_step_duration_seconds",
                "funnelcake_bot_deploy_duration_seconds",
                "funnelcake_bot_commits_behind_production",
                "funnelcake_bot_incidents_open",
            ):
                assert f"# HELP {name} " in metrics, name
        finally:
            await session.close()
        ack = await slack_sandbox.send_slash("status")
        assert "Working on it" in str(ack.get("payload", ack))
        async with asyncio.timeout(60):
            while not slack_sandbox.calls_to("chat.postMessage"):
                await asyncio.sleep(0.2)
        status = slack_sandbox.calls_to("chat.postMessage")[0]
        text = str(status.params.get("blocks"))
        for env_name in ("production", "staging", "poc"):
            assert f"*{env_name}*" in text

        # Slack goes away: the process is alive but not ready, and says why
        await slack_sandbox.stop()
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                status, body = await _get(session, f"{base}/readyz")
                if status == 503:
                    break
                await asyncio.sleep(0.2)
            assert "slack: Socket Mode is not connected" in body
            assert "ledger" not in body
            assert (await _get(session, f"{base}/healthz"))[0] == 200

        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 40)
        assert proc.returncode == 0, out.decode()[-2000:]
        # LOG_FORMAT=json: every line the process wrote is one JSON object
        lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
        # None of our own code failed. (slack_sdk logs its reconnect attempts with tracebacks while
        # the local Slack is down on purpose; that is the library's logging, not a bot failure.)
        ours = [r for r in lines if r["logger"].split(".")[0] in ("bot", "handlers", "funnelcake")]
        assert not [r for r in ours if "Traceback" in json.dumps(r)], ours
        assert any(r["message"].startswith("funnelcake-bot ready (socket mode") for r in lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_old_steps_are_pruned_by_the_running_bot_and_the_records_stay(
    sandbox: Sandbox, slack_sandbox: FakeSlack
) -> None:
    url = f"sqlite+aiosqlite:///{sandbox.root / 'retention-ledger.db'}"
    long_ago = datetime.now(UTC) - timedelta(days=45)
    old_ledger = await Ledger.open(url, clock=lambda: long_ago)
    try:
        old = await old_ledger.create_deploy(
            kind="deploy",
            envs=["poc"],
            ref="e7e79eb",
            short="e7e79eb",
            requester="U0ALICE",
            state=DeployState.RUNNING,
        )
        for step in ("resolve", "images", "verify"):
            await old_ledger.record_step(old.id, step, state=StepState.OK)
        await old_ledger.update_deploy(old.id, state=DeployState.SUCCEEDED)
    finally:
        await old_ledger.close()
    ledger = await Ledger.open(url)
    try:
        recent = await ledger.create_deploy(
            kind="deploy", envs=["poc"], ref="e7e79eb", short="e7e79eb", requester="U0ALICE"
        )
        await ledger.record_step(recent.id, "resolve", state=StepState.OK)
        bot = BotProcess(
            sandbox,
            slack_sandbox,
            name="retention",
            database_url=url,
            extra_env={"STEP_RETENTION_DAYS": "30", "RETENTION_EVERY": "0.5"},
        )
        async with bot:
            async with asyncio.timeout(60):
                while await ledger.steps(old.id):
                    await asyncio.sleep(0.2)
            async with asyncio.timeout(30):
                while "pruned 3 deploy step rows older than 30 days" not in bot.tail():
                    await asyncio.sleep(0.2)
        # the record itself, what history and a rollback read, is kept; recent steps are kept
        kept = await ledger.get_deploy(old.id)
        assert (kept.state, kept.tags) == (DeployState.SUCCEEDED, {"poc": "e7e79eb"})
        assert [r.id for r in await ledger.history("poc")] == [recent.id, old.id]
        assert [s.step for s in await ledger.steps(recent.id)] == ["resolve"]
        assert "Traceback" not in bot.tail(100_000)
    finally:
        await ledger.close()
