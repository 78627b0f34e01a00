"""Benchmark of the watcher: how soon a hand-made breakage reaches Slack, and what watching costs when
nothing happens.

Runs the local sandbox (real registries and git remotes, three simulated clusters) and two real bot
processes on one SQLite ledger each: `watching` with the watcher on (a channel configured, the default
`watch.every` of 3 s) and `peer`, the same bot with the watcher off.

  (a) detection, `--runs` times: a colleague pushes an arm64-only relay build to staging's registry, edits
      the overlay and syncs by hand; measured from the sync to the incident's post in the channel. Then
      they revert by hand and the bench waits for the post to close as recovered before the next run.
  (b) idle CPU: with nothing happening, each process's CPU time (utime + stime from /proc) over
      `--idle` seconds, as a share of one core; the peer is the bot's own floor (Slack, recovery, leases).

The last line is `watch detect_s=<median of (a)> idle_cpu_pct=<watching> peer_idle_cpu_pct=<peer>
watcher_cpu_pct=<the difference: what watching three envs costs>`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from pathlib import Path

# Run as `.venv/bin/python bench/watch.py` from anywhere: the test bed lives in the repository, not the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.testbed.botproc import BotProcess
from tests.testbed.gitrepos import overlay_path, push_from_second_clone, remote_file
from tests.testbed.sandbox import Sandbox
from tests.testbed.scenario import by_hand, set_tag
from tests.testbed.slack import DEFAULT_CHANNEL, FakeSlack, Message

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


async def posted(slack: FakeSlack, before: int, needle: str) -> Message:
    """The first channel message after the first `before` ones that says `needle`."""
    async with asyncio.timeout(120):
        while True:
            for m in slack.messages(DEFAULT_CHANNEL)[before:]:
                if needle in m.text:
                    return m
            await asyncio.sleep(0.05)


async def recovered(slack: FakeSlack, ts: str) -> None:
    async with asyncio.timeout(120):
        while True:
            if "Recovered" in slack.message(DEFAULT_CHANNEL, ts).text:
                return
            await asyncio.sleep(0.05)


async def main(runs: int, idle: float) -> None:
    async with FakeSlack(post_interval=0.05, post_burst=5) as slack:
        sandbox = Sandbox()  # its own temporary root, removed at stop
        await sandbox.start()
        try:
            await run(sandbox, slack, runs, idle)
        finally:
            await sandbox.stop()


async def run(sandbox: Sandbox, slack: FakeSlack, runs: int, idle: float) -> None:
    assert sandbox.git is not None
    # flap_window 0: each breakage is a new incident with a new post (within the window it would reopen the
    # last one, which is what a team wants and not what this bench times)
    sandbox.reconfigure(watch={"channel": DEFAULT_CHANNEL, "flap_window": 0})
    watching = BotProcess(sandbox, slack, name="watching", mode="http")
    peer = BotProcess(sandbox, slack, name="peer", mode="http")
    await watching.start()
    sandbox.reconfigure(watch={"enabled": False})  # the peer reads the file at its start
    peer.database_url = f"sqlite+aiosqlite:///{sandbox.root / 'peer-ledger.db'}"
    await peer.start()
    try:
        relay = overlay_path("relay", "staging")
        good = re.findall(
            r"newTag:\s*[\"']?([0-9a-f]{7})", remote_file(sandbox.git.gitops.path, relay).decode()
        )[-1]
        detect: list[float] = []
        for n in range(runs):
            tag = f"bad{n:04x}"  # seven hex digits, like a short commit
            await sandbox.registries.push("staging", "funnelcake-relay", tag, "arm64", seed=f"mac-{n}")
            push_from_second_clone(sandbox.git.gitops.url, relay, set_tag("relay", tag), f"relay: try {tag}")
            before = len(slack.messages(DEFAULT_CHANNEL))
            started = time.monotonic()
            await by_hand(sandbox, "staging", "funnelcake-relay", sync=True)
            post = await posted(slack, before, "funnelcake-relay pods failing in staging")
            detect.append(time.monotonic() - started)
            print(f"(a) run {n + 1}: posted after {detect[-1]:.1f} s")
            push_from_second_clone(sandbox.git.gitops.url, relay, set_tag("relay", good), "relay: back")
            await by_hand(sandbox, "staging", "funnelcake-relay", sync=True)
            await recovered(slack, post.ts)
        await asyncio.sleep(5)  # the last close settles
        assert watching.proc is not None
        assert peer.proc is not None
        w0, p0, t0 = cpu_seconds(watching.proc.pid), cpu_seconds(peer.proc.pid), time.monotonic()
        await asyncio.sleep(idle)
        w1, p1, t1 = cpu_seconds(watching.proc.pid), cpu_seconds(peer.proc.pid), time.monotonic()
        wall = t1 - t0
        w_pct, p_pct = 100 * (w1 - w0) / wall, 100 * (p1 - p0) / wall
        print(
            f"(a) detection over {runs} runs: median {statistics.median(detect):.1f} s, max {max(detect):.1f} s"
        )
        print(
            f"(b) idle over {wall:.0f} s: watching {w_pct:.2f}% of a core, peer without watcher {p_pct:.2f}%"
        )
        print(
            f"watch detect_s={statistics.median(detect):.1f} idle_cpu_pct={w_pct:.2f} peer_idle_cpu_pct={p_pct:.2f} "
            f"watcher_cpu_pct={w_pct - p_pct:.2f}"
        )
    finally:
        await watching.stop()
        await peer.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="breakages to detect")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.idle))
