"""What the real-process fault tests share: a slowed sandbox, bot processes killed at the end, and waits
on the ledger, the GitOps remote, the clusters and the Slack thread that say where things stood on a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.ledger import DeployRecord, DeployState, Ledger, StepRecord, StepState
from tests.testbed.botproc import BotProcess
from tests.testbed.gitrepos import git_out
from tests.testbed.kube.cluster import Timings
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import DEFAULT_CHANNEL, FakeSlack, Message

# Slow enough that a rollout of two pods takes a few seconds; the progress deadline (600 s x scale) stays
# far above that so slowness never reads as a stuck rollout.
SLOW = Timings(
    pull_delay=0.6,
    container_start=0.3,
    ready_delay=1.2,
    argo_reconcile=0.1,
    argo_sync=0.2,
    job_run=0.2,
    deadline_scale=0.1,
)
WAIT = 90.0  # generous: the machine is shared and loaded


@pytest.fixture
async def slow_sandbox(tmp_path: Path) -> AsyncIterator[Sandbox]:
    sb = Sandbox(timings=SLOW, root=tmp_path / "sandbox")
    await sb.start()
    try:
        yield sb
    finally:
        await sb.stop()


@pytest.fixture
async def bots() -> AsyncIterator[list[BotProcess]]:
    """Bot processes a test starts; whatever is still alive at the end is killed."""
    started: list[BotProcess] = []
    yield started
    for b in started:
        await b.kill()


async def push_head(sandbox: Sandbox) -> str:
    """CI built the app's head into the production registry only, as in the real flow."""
    assert sandbox.git is not None
    short = sandbox.git.app.commits["head"][:7]
    for image in ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate"):
        await sandbox.registries.push("production", image, short, "multi", seed=f"{image}:{short}")
    return short


async def launch(
    bots: list[BotProcess], sandbox: Sandbox, slack: FakeSlack, name: str, **kw: object
) -> BotProcess:
    bot = BotProcess(sandbox, slack, name=name, **kw)  # type: ignore[arg-type]
    bots.append(bot)
    await bot.start()
    return bot


async def newest(ledger: Ledger, env: str = "poc") -> DeployRecord | None:
    records = await ledger.history(env, 1)
    return records[0] if records else None


async def wait_step_running(
    ledger: Ledger, step: str, bot: BotProcess, after: str | None = None
) -> DeployRecord:
    """The newest poc deploy (other than `after`) once its `step` is running."""
    record: DeployRecord | None = None
    try:
        async with asyncio.timeout(WAIT):
            while True:
                record = await newest(ledger)
                if record is not None and record.id != after:
                    steps = await ledger.steps(record.id)
                    if any(s.step == step and s.state is StepState.RUNNING for s in steps):
                        return record
                    assert record.state is DeployState.RUNNING, (record.state, record.message, bot.tail())
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{step} never ran; newest deploy: {record}\n{bot.tail()}") from None


async def wait_finished(ledger: Ledger, deploy_id: str, *watching: BotProcess) -> DeployRecord:
    """The deploy once it ended; on a timeout, say where it stood and what the live bots logged."""
    try:
        async with asyncio.timeout(WAIT):
            while True:
                record = await ledger.get_deploy(deploy_id)
                if record.state.terminal:
                    return record
                await asyncio.sleep(0.1)
    except TimeoutError:
        record = await ledger.get_deploy(deploy_id)
        steps = [(s.step, s.state.value) for s in await ledger.steps(deploy_id)]
        lease = await ledger.get_lease("poc")
        logs = "\n".join(f"--- {b.name}\n{b.tail(3000)}" for b in watching)
        raise AssertionError(
            f"deploy {deploy_id} still {record.state.value} after {WAIT}s: owner {record.owner}, "
            f"steps {steps}, lease {lease}\n{logs}"
        ) from None


async def wait_thread(slack: FakeSlack, root_ts: str, *needles: str) -> str:
    """The thread's text once every needle is in it (the reporter batches writes about once a second)."""
    text = ""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            while True:
                text = "\n".join(m.text for m in slack.thread(DEFAULT_CHANNEL, root_ts))
                if all(n in text for n in needles):
                    return text
                await asyncio.sleep(0.1)
    raise AssertionError(f"thread lacks {needles}:\n{text}")


def deploy_commits(sandbox: Sandbox, since: str) -> list[str]:
    """Subjects of the commits pushed to the GitOps remote after `since`."""
    assert sandbox.git is not None
    out = git_out(sandbox.git.gitops.path, "log", "--format=%s", f"{since}..refs/heads/main")
    return out.splitlines() if out else []


def running_images(sandbox: Sandbox, env: str) -> dict[str, str]:
    assert sandbox.clusters is not None
    images = {}
    for service in ("api", "relay"):
        dep = sandbox.clusters[env].store.get("deployments", "funnelcake", f"funnelcake-{service}")
        assert dep is not None
        ready = dep.get("status", {}).get("readyReplicas") == dep["spec"]["replicas"]
        images[service] = (
            dep["spec"]["template"]["spec"]["containers"][0]["image"] if ready else "(not ready)"
        )
    return images


def step_names(steps: list[StepRecord], state: StepState) -> list[str]:
    return [s.step for s in steps if s.state is state]


def assert_clean_log(bot: BotProcess) -> None:
    log = bot.tail(1_000_000)
    assert "Traceback" not in log, log[-6000:]


async def wait_push(sandbox: Sandbox, since: str, bot: BotProcess) -> None:
    """Return the moment the GitOps remote's branch moves off `since` (polled every 10 ms)."""
    assert sandbox.git is not None
    loose = sandbox.git.gitops.path / "refs" / "heads" / "main"
    try:
        async with asyncio.timeout(WAIT):
            while True:
                # The loose ref file is what receive-pack writes; reading it is far cheaper than running git.
                if loose.exists() and loose.read_text().strip() != since:
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"nothing was pushed to the GitOps remote\n{bot.tail()}") from None


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP a test-bed server so calls to it hang (as a dead network does); SIGCONT on the way out."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# ---- what a colleague does by hand, following the old runbook ----

REFRESH = "argocd.argoproj.io/refresh"


def set_tag(service: str, tag: str) -> Any:
    """A colleague's `sed` on the overlay: the newTag in funnelcake-<service>'s images entry, everything
    else as it was (other entries, comments, quoting of the rest)."""

    def edit(text: str) -> str:
        items = re.split(r"(?m)(?=^\s*- )", text)
        hits = [i for i, item in enumerate(items) if re.search(rf"\bfunnelcake-{service}\b", item)]
        assert len(hits) == 1, text
        items[hits[0]], n = re.subn(r"(newTag:\s*)\"?[0-9a-f]{7}\"?", rf'\g<1>"{tag}"', items[hits[0]])
        assert n == 1, text
        return "".join(items)

    return edit


async def by_hand(sandbox: Sandbox, env: str, app: str, *, sync: bool) -> None:
    """`kubectl annotate … refresh=hard`, and with `sync` the runbook's sync patch, as a person runs them."""
    assert sandbox.clusters is not None
    store = sandbox.clusters[env].store

    def patch(obj: dict[str, Any]) -> None:
        obj["metadata"].setdefault("annotations", {})[REFRESH] = "hard"
        if sync:
            obj["operation"] = {"initiatedBy": {"username": "colleague"}, "sync": {"revision": "main"}}

    store.update("applications", "argocd", app, patch)


def board(slack: FakeSlack, user: str) -> Message:
    view = slack.home_views[user]
    return Message(ts="home", channel=f"home:{user}", user="", text="", blocks=view["blocks"])


async def until_board(slack: FakeSlack, user: str, needle: str, bot: BotProcess) -> Message:
    try:
        async with asyncio.timeout(WAIT):
            while user not in slack.home_views or needle not in board(slack, user).shown:
                await asyncio.sleep(0.1)
    except TimeoutError:
        seen = json.dumps(slack.home_views.get(user), indent=1)[:3000]
        raise AssertionError(f"the Home tab never showed {needle!r}:\n{seen}\n{bot.tail()}") from None
    return board(slack, user)
