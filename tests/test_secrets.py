"""No secret leaks: plant every credential, run the real process through a failing and a normal deploy, search all.

The process gets known Slack tokens, signing secret and git token; each simulated cluster's ClickHouse
Secret holds known credentials, and the simulated migrate program quotes its DSN (user and password) in
the failure line, as a driver error can. Then everything the test bed captured is searched: the process's
output, every Slack Web API call and Socket Mode ack, the GitOps remote's history, the ledger database,
the bot's checkouts and its /metrics page. None of the planted values may appear anywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.ledger import Ledger
from bot.ledger.models import DeployRecord, DeployState
from tests.testbed.kube.cluster import _secret_values
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import FakeSlack

CHANNEL = "C0DEPLOYS"
ENVS = ("production", "staging", "poc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _planted_slack() -> dict[str, str]:
    # Fresh each run, so a value can only be found where this run put it.
    return {
        "SLACK_BOT_TOKEN": f"xoxb-{secrets.randbelow(10**12)}-{secrets.token_hex(12)}",
        "SLACK_APP_TOKEN": f"xapp-1-A0FUNNEL-{secrets.randbelow(10**12)}-{secrets.token_hex(16)}",
        "SLACK_SIGNING_SECRET": secrets.token_hex(16),
    }


@pytest.fixture
def planted() -> dict[str, str]:
    values = _planted_slack()
    # No recognisable shape: only its registration as a secret can keep it out of the output.
    values["GIT_HTTPS_TOKEN"] = f"plantedgit{secrets.token_hex(10)}"
    for env in ENVS:
        # the cloud/self-hosted mode does not change the user and password
        creds = _secret_values(env, "self-hosted")
        values[f"{env} CLICKHOUSE_USER"] = creds["CLICKHOUSE_USER"]
        values[f"{env} CLICKHOUSE_PASSWORD"] = creds["CLICKHOUSE_PASSWORD"]
    return values


@pytest.fixture
async def planted_slack(planted: dict[str, str]) -> AsyncIterator[FakeSlack]:
    slack = FakeSlack(
        bot_token=planted["SLACK_BOT_TOKEN"],
        app_token=planted["SLACK_APP_TOKEN"],
        signing_secret=planted["SLACK_SIGNING_SECRET"],
        post_interval=0.05,
        post_burst=5,
    )
    await slack.start()
    try:
        yield slack
    finally:
        await slack.stop()


async def _wait_finished(ledger: Ledger, n: int, timeout: float, out: Path) -> list[DeployRecord]:  # noqa: ASYNC109
    records: list[DeployRecord] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                records = await ledger.history(None, 20)
                done = [r for r in records if r.state is not DeployState.RUNNING]
                if len(records) >= n and len(done) == len(records):
                    return records
                await asyncio.sleep(0.3)
    except TimeoutError:
        states = [(r.id, r.envs, r.state.value, r.last_step) for r in records]
        tail = (await asyncio.to_thread(out.read_text, errors="replace"))[-4000:]
        raise AssertionError(f"{n} deploys did not finish within {timeout}s: {states}\n{tail}") from None


async def _wait_replies(slack: FakeSlack, finals: int, timeout: float) -> None:  # noqa: ASYNC109
    """Until `finals` deploy threads got their closing reply (Done / Failed)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                texts = [r.text for m in slack.messages(CHANNEL) for r in m.replies]
                if sum(("*Done*" in t or "*Failed*" in t) for t in texts) >= finals:
                    return
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{finals} deploys did not finish in Slack:\n{slack.transcript()}") from None


def _git_history(bare: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(bare), "log", "-p", "--all", "--format=fuller"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def _files(root: Path) -> dict[str, bytes]:
    # Loose and packed git objects are zlib-compressed, so a byte search means nothing there; the
    # remote's history is searched uncompressed through `git log -p` instead.
    return {
        str(p): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "objects" not in p.relative_to(root).parts
    }


@pytest.mark.timeout(300)  # two deploys and a status report by a real process, on a loaded machine
async def test_planted_secrets_never_leave_the_process(
    sandbox: Sandbox, planted_slack: FakeSlack, planted: dict[str, str], tmp_path: Path
) -> None:
    slack = planted_slack
    assert sandbox.git is not None
    assert sandbox.clusters is not None
    app = sandbox.git.app
    head, broken = app.commits["head"][:7], app.commits["broken"][:7]
    # CI built both commits into the production registry; the deploys promote them (no build Job)
    for short in (head, broken):
        for image in ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate"):
            await sandbox.registries.push("production", image, short, "multi", seed=f"{image}:{short}")

    port = _free_port()
    ledger_path = sandbox.root / "secrets-ledger.db"
    work_dir = sandbox.root / "secrets-work"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "SLACK_BOT_TOKEN": planted["SLACK_BOT_TOKEN"],
        "SLACK_APP_TOKEN": planted["SLACK_APP_TOKEN"],
        "SLACK_SIGNING_SECRET": planted["SLACK_SIGNING_SECRET"],
        "GIT_HTTPS_TOKEN": planted["GIT_HTTPS_TOKEN"],
        "SLACK_API_URL": slack.api_url,
        "SLACK_MODE": "socket",
        "FUNNELCAKE_CONFIG": str(sandbox.config_path),
        "KUBECONFIG": str(sandbox.kubeconfig_path),
        "DATABASE_URL": f"sqlite+aiosqlite:///{ledger_path}",
        "WORK_DIR": str(work_dir),
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(port),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "DEBUG",  # the libraries' request dumps too
    }
    out_path = tmp_path / "bot.out"
    # a file, not a pipe: nobody reads a pipe during the deploys, and a full one would stall the bot
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    ledger: Ledger | None = None
    try:
        await slack.wait_connected(timeout=60)
        await slack.send_slash(f"deploy staging {broken}", channel_id=CHANNEL)
        await slack.send_slash(f"deploy poc {head}", channel_id=CHANNEL)
        ledger = await Ledger.open(f"sqlite+aiosqlite:///{ledger_path}")
        records = {r.envs[0]: r for r in await _wait_finished(ledger, 2, 150, out_path)}
        await _wait_replies(slack, 2, 30)
        # the ephemeral history quotes the failure message; status is a channel message with blocks
        await slack.send_slash("history staging", channel_id=CHANNEL)
        await slack.send_slash("status", channel_id=CHANNEL)
        async with asyncio.timeout(60):
            while not (
                any(m.ephemeral_to for ch in slack.channels() for m in slack.messages(ch))
                and any(
                    c.params.get("text") == "funnelcake status" for c in slack.calls_to("chat.postMessage")
                )
            ):
                await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            metrics = await resp.text()
    finally:
        if ledger is not None:
            await ledger.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 40)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    output = out_path.read_text(errors="replace")
    assert proc.returncode == 0, output[-3000:]

    # The two deploys went the way the leak needs: the migration failed quoting its DSN, poc succeeded.
    assert records["staging"].state is DeployState.FAILED, records["staging"].message
    assert records["poc"].state is DeployState.SUCCEEDED, records["poc"].message
    staging = sandbox.clusters["staging"]
    assert staging.clickhouse.dirty
    pods, _ = staging.store.list("pods", "funnelcake", label_selector="job-name=funnelcake-db-migrate")
    job_log = "".join(staging.store.get_log("funnelcake", p["metadata"]["name"], "migrate") for p in pods)
    assert planted["staging CLICKHOUSE_PASSWORD"] in job_log, "the simulated migrate must print its DSN"
    # ... and the bot saw that line, with the credentials cut out
    thread = "\n".join(json.dumps(c.params) for c in slack.calls_to("chat.postMessage"))
    assert "Dirty database version 4" in thread
    assert "username=[REDACTED]&amp;password=[REDACTED]" in thread  # Slack-escaped &
    # The metrics saw both results.
    assert 'funnelcake_bot_deploys_total{env="staging",kind="deploy",result="failed"} 1.0' in metrics
    assert 'funnelcake_bot_deploys_total{env="poc",kind="deploy",result="succeeded"} 1.0' in metrics

    # Everything the test bed captured.
    haystacks: dict[str, str | bytes] = {
        "process output": output,
        "metrics": metrics,
        "slack calls": json.dumps([[c.method, c.params, c.response] for c in slack.calls]),
        "socket mode acks": json.dumps(slack.acks),
        "response_url posts": json.dumps([r.body for r in slack.responses]),
        "gitops remote history": _git_history(sandbox.git.gitops.path),
    }
    for path in sandbox.root.glob("secrets-ledger.db*"):
        haystacks[f"ledger {path.name}"] = path.read_bytes()
    haystacks.update({f"checkout {k}": v for k, v in _files(work_dir).items()})
    assert haystacks["gitops remote history"].count(f"funnelcake @ {head}") >= 1
    assert len(haystacks) > 8

    leaks = [
        f"{name} in {where}"
        for name, value in planted.items()
        for where, text in haystacks.items()
        if (value.encode() in text if isinstance(text, bytes) else value in text)
    ]
    assert not leaks, "planted secrets leaked:\n" + "\n".join(leaks)
