"""Soak: 200 deploys in a row through one bot process, and whether it stays the same process at the end.

Runs the local sandbox (real registries and git remotes, simulated clusters, the fake Slack) and one
`python -m bot` in Socket Mode. CI has built two commits (`relay-tune` and `head`); the deploys alternate
between them and between poc and staging, each asked for with `/funnelcake deploy` in Slack and waited
for in the ledger. After deploy `--window` (20) and after the last one, with the bot idle, it reads:

  RSS and open file descriptors   /proc/<pid>/status and /proc/<pid>/fd of the bot process
  asyncio tasks                   the bot's `funnelcake_bot_asyncio_tasks` gauge on /metrics

and compares the mean wall time (the ledger's created → finished) of the first `--window` deploys with
that of the last `--window`. Targets: RSS growth ≤ 10 %, descriptors and tasks flat, time ≤ 1.1x.

The last line is `soak deploys=… rss_growth_pct=… fds_first=… fds_last=… tasks_first=… tasks_last=…
time_x=…`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.ledger import DeployRecord, DeployState, Ledger
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


def open_fds(pid: int) -> list[str]:
    """What each open descriptor points at (a file, socket:[…], pipe:[…], anon_inode:[eventpoll] …)."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed between the listing and the read
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def _kind(target: str) -> str:
    return target.split(":", maxsplit=1)[0] if ":" in target else "file"


async def tasks(bot: BotProcess) -> int:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"{bot.url}/metrics") as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("funnelcake_bot_asyncio_tasks "):
            return int(float(line.split()[1]))
    raise RuntimeError("the bot's /metrics has no funnelcake_bot_asyncio_tasks")


async def sample(bot: BotProcess, pid: int) -> tuple[int, list[str], int]:
    # idle: no deploy running, the last thread messages sent; a moment for the loop to settle
    await asyncio.sleep(1.0)
    return rss_kib(pid), open_fds(pid), await tasks(bot)


async def deploy(slack: FakeSlack, ledger: Ledger, env: str, short: str, after: str | None) -> DeployRecord:
    """One deploy through Slack, waited for in the ledger: its final record."""
    await slack.send_slash(f"deploy {env} {short} --allow-downgrade")
    async with asyncio.timeout(WAIT):
        while True:
            [record] = await ledger.history(env, 1) or [None]
            if record is not None and record.id != after and record.state.terminal:
                break
            await asyncio.sleep(0.05)
    if record.state is not DeployState.SUCCEEDED:
        raise RuntimeError(f"deploy {record.id} of {short} to {env} {record.state.value}: {record.message}")
    return record


def wall(record: DeployRecord) -> float:
    assert record.finished_at is not None
    return (record.finished_at - record.created_at).total_seconds()


async def step_means(ledger: Ledger, records: list[DeployRecord]) -> dict[str, float]:
    """Each step's mean duration over the records (where the time went, when the last deploys are slower)."""
    took: dict[str, list[float]] = {}
    for r in records:
        for st in await ledger.steps(r.id):
            if st.finished_at is not None:
                took.setdefault(st.step, []).append((st.finished_at - st.started_at).total_seconds())
    return {name: statistics.mean(v) for name, v in took.items()}


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
            records: list[DeployRecord] = []
            last: dict[str, str | None] = dict.fromkeys(ENVS)
            first: tuple[int, list[str], int] = (0, [], 0)
            t0 = time.perf_counter()
            for i in range(args.deploys):
                env = ENVS[i % 2]
                short = shorts[(i // 2) % 2]  # each env gets the other commit every time
                records.append(await deploy(slack, ledger, env, short, last[env]))
                last[env] = records[-1].id
                if i + 1 == args.window:
                    first = await sample(bot, pid)
                if (i + 1) % 20 == 0:
                    print(f"  {i + 1} deploys, {time.perf_counter() - t0:.0f} s", flush=True)
            end = await sample(bot, pid)
            steps_head = await step_means(ledger, records[: args.window])
            steps_tail = await step_means(ledger, records[-args.window :])
        finally:
            await ledger.close()
    finally:
        await bot.stop()
        await slack.stop()
        await sandbox.stop()

    walls = [wall(r) for r in records]
    head, tail = walls[: args.window], walls[-args.window :]
    rss_growth = (end[0] - first[0]) / first[0] * 100
    time_x = statistics.mean(tail) / statistics.mean(head)
    print(
        f"\n{args.deploys} deploys (alternating {' and '.join(COMMITS)}, {' and '.join(ENVS)}), one bot process"
    )
    print(f"  {'':<22} {'after first ' + str(args.window):>16} {'after last ' + str(args.window):>16}")
    print(f"  {'RSS':<22} {first[0] / 1024:>13.1f} MiB {end[0] / 1024:>13.1f} MiB   {rss_growth:+.1f} %")
    print(f"  {'open fds':<22} {len(first[1]):>16} {len(end[1]):>16}")
    for kind in sorted({_kind(t) for t in first[1] + end[1]}):
        a, b = (sum(_kind(t) == kind for t in fds) for fds in (first[1], end[1]))
        print(f"    {kind:<20} {a:>16} {b:>16}")
    print(f"  {'asyncio tasks':<22} {first[2]:>16} {end[2]:>16}")
    print(
        f"  {'deploy wall time':<22} {statistics.mean(head):>14.2f} s {statistics.mean(tail):>14.2f} s   {time_x:.2f}x"
        f"  (median {statistics.median(head):.2f} s vs {statistics.median(tail):.2f} s)"
    )
    print(f"  {'mean step time':<22}")
    for name, a in steps_head.items():
        b = steps_tail.get(name, 0.0)
        print(f"    {name:<20} {a:>14.3f} s {b:>14.3f} s   {b / a if a else 0:.2f}x")
    print(
        f"soak deploys={args.deploys} rss_growth_pct={rss_growth:.1f} fds_first={len(first[1])} fds_last={len(end[1])} "
        f"tasks_first={first[2]} tasks_last={end[2]} time_x={time_x:.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
