"""A ledger the bot cannot use, as an operator meets it: `python -m bot` at start-up and `python -m bot.cli
history` each say in one sentence which part of DATABASE_URL is wrong (or that the ledger is down, or its disk
full) and what to do, exit 2 and never show a traceback or the password; /readyz says "ledger unreachable"
in words that give away nothing about where the ledger is."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bot.errors import LedgerUnavailable
from bot.ledger import DeployKind, Ledger
from tests.testbed.botproc import BotProcess
from tests.testbed.disk import fill, small_disk
from tests.testbed.pg import PG_HOST, PG_PORT, ThrowawayPostgres, postgres  # noqa: F401 - a fixture
from tests.testbed.sandbox import Sandbox
from tests.testbed.scenario import launch
from tests.testbed.slack import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.testbed.tcpproxy import TcpProxy

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-Pw-h19"
MISSING_DB = f"funnelcake_missing_{secrets.token_hex(4)}"


def bad_urls(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(DATABASE_URL, what the one sentence says, what it tells to do)."""
    a_dir = tmp_path / "ledger-dir"
    a_dir.mkdir()
    return [
        (
            f"postgresql://funnel:{PASSWORD}@db.internal:notaport/funnelcake",
            "DATABASE_URL: the port 'notaport' is not a number",
            "give the database server's port after the host",
        ),
        (
            f"postgresql://postgres:{PASSWORD}@{PG_HOST}:{PG_PORT}/{MISSING_DB}",
            f"DATABASE_URL: the database '{MISSING_DB}' does not exist on {PG_HOST}:{PG_PORT}",
            f"create it (createdb {MISSING_DB}) or fix the database name",
        ),
        (
            f"mysql://funnel:{PASSWORD}@db.internal/funnelcake",
            "DATABASE_URL: the scheme 'mysql' is not a database the ledger supports",
            "use sqlite or postgresql",
        ),
        (
            # /proc takes no new files, not even from root: the directory the bot may not write to
            "sqlite:////proc/ledger.db",
            "DATABASE_URL: the SQLite file /proc/ledger.db cannot be opened or created",
            "check that the bot's user may read and write /proc",
        ),
        (
            f"sqlite:///{a_dir}",
            f"DATABASE_URL: {a_dir} is a directory, not a file",
            f"name a file in it, as in sqlite:///{a_dir / 'ledger.db'}",
        ),
        (
            f"postgresql://funnel:{PASSWORD}@no-such-host.invalid:5432/funnelcake",
            "The deploy ledger (PostgreSQL no-such-host.invalid:5432/funnelcake) is unreachable: "
            "its host name is not found",
            "check the host in DATABASE_URL",
        ),
        (
            f"postgresql://funnel:{PASSWORD}@127.0.0.1:1/funnelcake",
            "The deploy ledger (PostgreSQL 127.0.0.1:1/funnelcake) is unreachable: the connection was refused",
            "check that the database is up and that DATABASE_URL's host and port point at it",
        ),
        (
            f"postgresql://nobody_h19:{PASSWORD}@{PG_HOST}:{PG_PORT}/postgres",
            f"DATABASE_URL: {PG_HOST}:{PG_PORT} refused the user 'nobody_h19' (unknown user or wrong password)",
            "check the user and password in DATABASE_URL",
        ),
    ]


def _env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_APP_TOKEN": APP_TOKEN,
        "SLACK_MODE": "socket",
        "FUNNELCAKE_CONFIG": str(ROOT / "config" / "funnelcake.yaml"),
        "DATABASE_URL": database_url,
        "WORK_DIR": str(tmp_path / "work"),
        "LOG_FORMAT": "json",
    }


async def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def _the_error(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    return errors[0]


async def test_every_bad_database_url_is_one_sentence_with_exit_2_at_start_up_and_in_the_cli(
    tmp_path: Path,
) -> None:
    cases = bad_urls(tmp_path)
    slots = asyncio.Semaphore(4)  # a few processes at a time: the machine's cores are shared

    async def one(env: dict[str, str], *args: str) -> tuple[int, str]:
        async with slots:
            return await _run(env, *args)

    async def both(url: str) -> list[tuple[int, str]]:
        env = _env(url, tmp_path)
        return list(await asyncio.gather(one(env, "-m", "bot"), one(env, "-m", "bot.cli", "history")))

    results = await asyncio.gather(*(both(url) for url, _, _ in cases))
    for (url, says, fix), runs in zip(cases, results, strict=True):
        for (code, output), where in zip(runs, ("python -m bot", "bot.cli history"), strict=True):
            assert code == 2, (where, url, output)
            line = _the_error(output)
            assert line.startswith(f"error: {says}"), (where, line)
            assert fix in line, (where, line)
            assert "Traceback" not in output, (where, output)
            assert PASSWORD not in output, (where, output)
            assert "internal error" not in output


async def test_a_full_disk_says_disk_full(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", size="1m") as disk:
        await asyncio.to_thread(fill, disk)
        code, output = await _run(
            _env(f"sqlite:///{disk / 'ledger.db'}", tmp_path), "-m", "bot.cli", "history"
        )
    assert code == 2, output
    line = _the_error(output)
    assert line.startswith(
        f"error: The deploy ledger (SQLite file {disk / 'ledger.db'}) cannot write: its disk is full"
    )
    assert "free space on the volume that holds it" in line
    assert "unreachable" not in line and "busy" not in line
    assert "Traceback" not in output


async def _write_until_refused(ledger: Ledger) -> LedgerUnavailable:
    for _ in range(500):  # until SQLite's free pages run out too
        try:
            await ledger.create_deploy(kind=DeployKind.DEPLOY, envs=["poc"], ref="x" * 2000, requester="U1")
        except LedgerUnavailable as e:
            return e
    raise AssertionError("500 deploys fitted on a full disk")


async def test_a_full_disk_under_a_running_ledger_is_a_retryable_disk_full(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", size="2m") as disk:
        ledger = await Ledger.open(f"sqlite:///{disk / 'ledger.db'}")
        try:
            filler = await asyncio.to_thread(fill, disk)
            full = await _write_until_refused(ledger)
            assert full.reason == "disk full", (full, full.detail)
            assert "its disk is full" in full.message
            filler.unlink()
            await ledger.create_deploy(kind=DeployKind.DEPLOY, envs=["poc"], ref="e7e79eb", requester="U1")
        finally:
            await ledger.close()


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with TcpProxy((PG_HOST, PG_PORT)) as p:
        yield p


async def test_readyz_says_ledger_unreachable_without_where_it_is(
    sandbox: Sandbox,
    slack_sandbox: FakeSlack,
    postgres: ThrowawayPostgres,  # noqa: F811 - the fixture
    proxy: TcpProxy,
    bots: list[BotProcess],
) -> None:
    url = postgres.url.replace(f"{PG_HOST}:{PG_PORT}", proxy.address)
    bot = await launch(bots, sandbox, slack_sandbox, "ready", database_url=url, mode="http")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:

        async def get(path: str) -> tuple[int, str]:
            async with session.get(f"{bot.url}{path}") as resp:
                return resp.status, await resp.text()

        assert await get("/readyz") == (200, '{"status": "ready"}')
        await proxy.stop()  # the ledger's address now refuses connections
        async with asyncio.timeout(60):
            while (answer := await get("/readyz"))[0] != 503:
                await asyncio.sleep(0.2)
        body = json.loads(answer[1])
        assert body == {"status": "not ready", "problems": ["ledger unreachable: connection refused"]}
        for secret_ish in (str(proxy.port), postgres.name, "127.0.0.1", "asyncpg", "Error", "PostgreSQL"):
            assert secret_ish not in answer[1]
        assert (await get("/healthz"))[0] == 200
    # the operator finds the details in the bot's log
    await bot.stop()
    assert (
        f"not ready: The deploy ledger (PostgreSQL {proxy.address}/{postgres.name}) is unreachable"
        in bot.tail(10**6)
    )
