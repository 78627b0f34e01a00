"""Overhead: a poc deploy's wall time vs the simulated cluster's own time for the same work, median of 5.

Runs the local sandbox with the demo's timings (tests/testbed/demo.py: image pulls, container starts,
readiness, the migration Job's run and Argo CD's reconcile and sync take tenths of a second, as a person
can watch them) and one `python -m bot` in Socket Mode. Each round deploys the other of two commits to
poc through `/funnelcake deploy`; the deploy's wall time is the ledger's created → finished.

The cluster's own time is read from the simulated cluster itself: every change to its objects is
timestamped as the store makes it, and three kinds of interval are taken from them:

  migration Job   created → its Complete condition
  Argo CD refresh an Application's hard-refresh annotation set → consumed
  Argo CD sync    an Application's operation set → ended and compared once more (a new reconciledAt)
  rollout         a Deployment's new generation → that generation fully updated and available

Their union (the two apps sync and roll out side by side) is the time the cluster was busy with work the
bot asked for; everything else in the wall time is the bot's own: resolving the commit, promoting the
images, the GitOps push, the checks before and after, and how soon it notices each phase ended.

The last line is `overhead ratio=<wall / cluster, median> wall_s=… cluster_s=…`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.ledger import DeployState, Ledger
from tests.testbed.botproc import BotProcess
from tests.testbed.demo import DEMO_TIMINGS
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import FakeSlack

IMAGES = ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate")
COMMITS = ("relay-tune", "head")
ENV = "poc"
WAIT = 120.0
REFRESH = "argocd.argoproj.io/refresh"


def _complete(job: dict[str, Any]) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Complete" and c.get("status") == "True" for c in conditions)


def _rolled_out(dep: dict[str, Any]) -> bool:
    spec, status = dep.get("spec") or {}, dep.get("status") or {}
    want = int(spec.get("replicas", 1))
    return (
        int(status.get("observedGeneration", 0)) >= int(dep["metadata"].get("generation", 0))
        and int(status.get("updatedReplicas", 0)) == want
        and int(status.get("availableReplicas", 0)) == want
        and int(status.get("replicas", 0)) == want
    )


class ClusterClock:
    """Follows one simulated cluster's changes and turns them into [start, end] intervals of its own work."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.queue = store.subscribe()
        self.intervals: list[tuple[float, float]] = []
        self._open: dict[tuple[str, str], float] = {}
        self._generation: dict[str, int] = {}
        self._done_at: dict[str, str | None] = {}  # app -> its reconciledAt when its operation ended
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            kind, resource, obj = await self.queue.get()
            # the store queues each change as it makes it; this loop reads it on the loop's next turn
            self._see(time.monotonic(), kind, resource, obj)

    def _begin(self, key: tuple[str, str], at: float) -> None:
        self._open.setdefault(key, at)

    def _end(self, key: tuple[str, str], at: float) -> None:
        start = self._open.pop(key, None)
        if start is not None:
            self.intervals.append((start, at))

    def _see(self, at: float, kind: str, resource: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if resource == "jobs":
            if kind == "ADDED":
                self._begin(("job", name), at)
            elif _complete(obj):
                self._end(("job", name), at)
        elif resource == "applications":
            # Argo CD's own work on an app: a hard refresh until consumed; an operation until it ended and
            # the controller compared the app once more (a new reconciledAt), as the bot waits for
            status = obj.get("status") or {}
            if REFRESH in (obj["metadata"].get("annotations") or {}):
                self._begin(("refresh", name), at)
            else:
                self._end(("refresh", name), at)
            reconciled = status.get("reconciledAt")
            if obj.get("operation"):
                self._begin(("sync", name), at)
                self._done_at.pop(name, None)
            elif ("sync", name) in self._open:
                if name not in self._done_at:
                    self._done_at[name] = reconciled
                elif reconciled != self._done_at[name]:
                    self._end(("sync", name), at)
                    del self._done_at[name]
        elif resource == "deployments":
            generation = int(obj["metadata"].get("generation", 0))
            if generation > self._generation.get(name, generation):
                self._begin(("rollout", name), at)
            self._generation[name] = generation
            if _rolled_out(obj):
                self._end(("rollout", name), at)

    def busy(self, start: float, end: float) -> float:
        """Seconds within [start, end] covered by at least one interval."""
        spans = sorted((max(a, start), min(b, end)) for a, b in self.intervals if b > start and a < end)
        total, reach = 0.0, start
        for a, b in spans:
            if b > reach:
                total += b - max(a, reach)
                reach = b
        return total

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.store.unsubscribe(self.queue)


def _mono(at: datetime) -> float:
    """A ledger timestamp (wall clock) on the monotonic clock the cluster's intervals use."""
    return time.monotonic() + (at.timestamp() - time.time())


async def deploy(slack: FakeSlack, ledger: Ledger, short: str, after: str | None) -> tuple[str, float, float]:
    """One deploy through Slack; its id and (monotonic) start and end, as the ledger recorded them."""
    await slack.send_slash(f"deploy {ENV} {short} --allow-downgrade")
    async with asyncio.timeout(WAIT):
        while True:
            [record] = await ledger.history(ENV, 1) or [None]
            if record is not None and record.id != after and record.state.terminal:
                break
            await asyncio.sleep(0.05)
    if record.state is not DeployState.SUCCEEDED:
        raise RuntimeError(f"deploy {record.id} of {short} {record.state.value}: {record.message}")
    assert record.finished_at is not None
    return record.id, _mono(record.created_at), _mono(record.finished_at)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    sandbox = Sandbox(timings=DEMO_TIMINGS)
    slack = FakeSlack(post_interval=None)
    await sandbox.start()
    await slack.start()
    bot = BotProcess(sandbox, slack, name="overhead", lease_ttl=30.0, recovery_every=5.0)
    rows: list[tuple[float, float]] = []
    steps: dict[str, list[tuple[float, float]]] = {}
    try:
        assert sandbox.git is not None
        assert sandbox.clusters is not None
        shorts = [sandbox.git.app.short(label) for label in COMMITS]
        for short in shorts:
            for image in IMAGES:
                await sandbox.registries.push("production", image, short, "multi", seed=f"{image}:{short}")
        await bot.start()
        clock = ClusterClock(sandbox.clusters[ENV].store)
        ledger = await Ledger.open(bot.database_url)
        try:
            last: str | None = None
            for i in range(args.rounds + 1):  # the first round warms the bot's mirrors and connections
                last, start, end = await deploy(slack, ledger, shorts[i % 2], last)
                await asyncio.sleep(0.5)  # the old pods' termination is the cluster's, after the deploy
                if i:
                    rows.append((end - start, clock.busy(start, end)))
                    for st in await ledger.steps(last):
                        if st.finished_at is not None:
                            a, b = _mono(st.started_at), _mono(st.finished_at)
                            steps.setdefault(st.step, []).append((b - a, clock.busy(a, b)))
        finally:
            await ledger.close()
            await clock.close()
    finally:
        await bot.stop()
        await slack.stop()
        await sandbox.stop()

    print(f"\npoc deploys with the demo's cluster timings, {args.rounds} rounds (after one warm-up)")
    print(f"  {'round':<6} {'wall':>8} {'cluster':>8} {'ratio':>6}")
    for n, (wall, busy) in enumerate(rows, 1):
        print(f"  {n:<6} {wall:>7.2f}s {busy:>7.2f}s {wall / busy:>5.2f}x")
    print(f"  {'step (median)':<14} {'wall':>8} {'cluster':>8}")
    for name, spans in steps.items():
        print(
            f"  {name:<14} {statistics.median(w for w, _ in spans):>7.3f}s "
            f"{statistics.median(b for _, b in spans):>7.3f}s"
        )
    ratio = statistics.median(w / b for w, b in rows)
    print(
        f"overhead ratio={ratio:.2f} wall_s={statistics.median(w for w, _ in rows):.2f} "
        f"cluster_s={statistics.median(b for _, b in rows):.2f}"
    )


if __name__ == "__main__":
    asyncio.run(main())
