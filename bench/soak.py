"""Soak: 200 deploys in a row through one bot process, and whether it stays the same process at the end.

Runs the local sandbox (real registries and git remotes, simulated clusters, the fake Slack) and one
`python -m bot` in Socket Mode. CI has built two commits (`relay-tune` and `head`); the deploys alternate
between them and between poc and staging, each asked for with `/funnelcake deploy` in Slack and waited
for in the ledger. After deploy `--window` (20) and after the last one, with the bot idle, it reads:

  RSS and open file descriptors   /proc/<pid>/status and /proc/<pid>/fd of the bot process
  asyncio tasks                   the bot's `asyncio_tasks` gauge on /metrics

and compares the mean wall time (the ledger's created → finished) of the first `--window` deploys with
that of the last `--window`. Targets: RSS growth ≤ 10 %, descriptors and tasks flat, time ≤ 1.1x.

The last line is `soak deploys=… rss_growth_pct=… fds_first=… fds_last=… tasks_first=… tasks_last=…
time_x=…`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.ledger import DeployState, Ledger
from tests.testbed.botproc import BotProcess
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import FakeSlack

IMAGES = ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate")
COMMITS = ("relay-tune", "head")
ENVS = ("poc", "staging")
WAIT = 120.0  # one deploy, on a loaded machine, at the most


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def tasks(bot: BotProcess) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"{bot.url}/metrics") as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("asyncio_tasks "):
            return int(float(line.split()[1]))
    raise RuntimeError("the bot's /metrics has no asyncio_tasks")


async def sample(bot: BotProcess, pid: int) -> tuple[int, int, int]:
    # idle: no deploy running, the last thread messages sent; a moment for the loop to settle
    await asyncio.sleep(1.0)
    return rss_kib(pid), open_fds(pid), await tasks(bot)


async def deploy(slack: FakeSlack, ledger: Ledger, env: str, short: str, after: str | None) -> float:
    """One deploy through Slack, waited for in the ledger; its wall time as the ledger recorded it."""
    await slack.send_slash(f"deploy {env} {short} --allow-downgrade")
    async with asyncio.timeout(WAIT):
        while True:
            [record] = await ledger.history(env, 1) or [None]
            if record is not None and record.id != after and record.state.terminal:
                break
            await asyncio.sleep(0.05)
    if record.state is not DeployState.SUCCEEDED:
        raise RuntimeError(f"deploy {record.id} of {short} to {env} {record.state.value}: {record.message}")
    assert record.finished_at is not None
    return (record.finished_at - record.created_at).total_seconds()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deploys", type=int, default=200)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args()
    if args.deploys < 2 * args.window:
        parser.error("--deploys must be at least twice --window")

    sandbox = Sandbox()
    slack = FakeSlack(post_interval=None)
    await sandbox.start()
    await slack.start()
    bot = BotProcess(sandbox, slack, name="soak", lease_ttl=30.0, recovery_every=5.0)
    try:
        assert sandbox.git is not None
        shorts = [sandbox.git.app.short(label) for label in COMMITS]
        for short in shorts:  # CI built both commits into the production registry
            for image in IMAGES:
                await sandbox.registries.push("production", image, short, "multi", seed=f"{image}:{short}")
        await bot.start()
        assert bot.proc is not None
        pid = bot.proc.pid
        ledger = await Ledger.open(bot.database_url)
        try:
            walls: list[float] = []
            last: dict[str, str | None] = dict.fromkeys(ENVS)
            first = (0, 0, 0)
            t0 = time.perf_counter()
            for i in range(args.deploys):
                env = ENVS[i % 2]
                short = shorts[(i // 2) % 2]  # each env gets the other commit every time
                walls.append(await deploy(slack, ledger, env, short, last[env]))
                last[env] = (await ledger.history(env, 1))[0].id
                if i + 1 == args.window:
                    first = await sample(bot, pid)
                if (i + 1) % 20 == 0:
                    print(f"  {i + 1} deploys, {time.perf_counter() - t0:.0f} s", flush=True)
            end = await sample(bot, pid)
        finally:
            await ledger.close()
    finally:
        await bot.stop()
        await slack.stop()
        await sandbox.stop()

    head, tail = walls[: args.window], walls[-args.window :]
    rss_growth = (end[0] - first[0]) / first[0] * 100
    time_x = statistics.mean(tail) / statistics.mean(head)
    print(
        f"\n{args.deploys} deploys (alternating {' and '.join(COMMITS)}, {' and '.join(ENVS)}), one bot process"
    )
    print(f"  {'':<22} {'after first ' + str(args.window):>16} {'after last ' + str(args.window):>16}")
    print(f"  {'RSS':<22} {first[0] / 1024:>13.1f} MiB {end[0] / 1024:>13.1f} MiB   {rss_growth:+.1f} %")
    print(f"  {'open fds':<22} {first[1]:>16} {end[1]:>16}")
    print(f"  {'asyncio tasks':<22} {first[2]:>16} {end[2]:>16}")
    print(
        f"  {'deploy wall time':<22} {statistics.mean(head):>14.2f} s {statistics.mean(tail):>14.2f} s   {time_x:.2f}x"
        f"  (median {statistics.median(head):.2f} s vs {statistics.median(tail):.2f} s)"
    )
    print(
        f"soak deploys={args.deploys} rss_growth_pct={rss_growth:.1f} fds_first={first[1]} fds_last={end[1]} "
        f"tasks_first={first[2]} tasks_last={end[2]} time_x={time_x:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
