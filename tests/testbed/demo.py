"""`make demo`: the whole story on the local sandbox, printed the way people in #deploys would see it.

Starts real registries, git remotes, three simulated clusters and a local Slack, runs the real bot app,
and plays a scripted tour through signed Slack requests. `--interactive` then lets you type commands.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import time
from typing import TextIO

from tests.testbed.botrun import RunningBot
from tests.testbed.gitrepos import push_from_second_clone
from tests.testbed.kube.cluster import Timings
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import DEFAULT_CHANNEL, FakeSlack

# Slow enough to watch, fast enough for the whole tour to fit in about a minute.
DEMO_TIMINGS = Timings(
    pull_delay=0.2,
    pull_backoff=0.3,
    pull_backoff_max=1.0,
    container_start=0.2,
    ready_delay=0.4,
    crash_after=0.3,
    crash_backoff=0.5,
    crash_backoff_max=2.0,
    job_run=0.5,
    job_retry_backoff=0.2,
    argo_reconcile=0.1,
    argo_sync=0.3,
    deadline_scale=0.05,
)
IMAGES = ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate")
USERS = {"alice": "U0ALICE", "bob": "U0BOB", "carol": "U0CAROL", "dave": "U0DAVE"}


class Tour:
    def __init__(self, bot: RunningBot, slack: FakeSlack, *, out: TextIO = sys.stdout) -> None:
        self.bot = bot
        self.slack = slack
        self.out = out
        self.seen: dict[str, str] = {}
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", file=self.out)

    async def command(self, text: str, user: str = "alice") -> None:
        print(f"\n{user}> /funnelcake {text}", file=self.out)
        ack = await self.bot.command(text, user=USERS[user])
        if ack.strip():
            print(f"  (only visible to {user}) {ack.strip()[:300]}", file=self.out)
        await self.bot.settle()

    async def click(self, label_pattern: str, user: str) -> None:
        for message in reversed(self.slack.messages(DEFAULT_CHANNEL)):
            for candidate in [*reversed(message.replies), message]:
                for b in candidate.buttons():
                    if re.search(label_pattern, b["text"]["text"]):
                        print(f"\n{user} clicks [{b['text']['text']}]", file=self.out)
                        await self.bot.click(candidate.ts, b["action_id"], user=USERS[user])
                        await self.bot.settle()
                        return
        raise LookupError(f"no button matching {label_pattern!r} in the channel")

    def new_messages(self) -> None:
        """Print every root message (with its thread) that is new or changed since the last call."""
        for message in self.slack.messages(DEFAULT_CHANNEL):
            lines = self.slack._render(message, indent="")
            for reply in message.replies:
                lines += self.slack._render(reply, indent="    ")
            text = "\n".join(lines)
            if self.seen.get(message.ts) != text:
                print(text, file=self.out)
                self.seen[message.ts] = text


async def tour(bot: RunningBot, sandbox: Sandbox, slack: FakeSlack, *, out: TextIO = sys.stdout) -> None:
    assert sandbox.git is not None
    assert sandbox.clusters is not None
    t = Tour(bot, slack, out=out)
    app = sandbox.git.app
    head = app.commits["head"][:7]

    t.say("1. status: what runs where (staging and poc are behind production)")
    await t.command("status")
    t.new_messages()

    t.say(f"2. CI built {head} into the production registry only; alice deploys it to poc")
    for image in IMAGES:
        await sandbox.registries.push("production", image, head, "multi", seed=f"{image}:{head}")
    await t.command(f"deploy poc {head}")
    t.new_messages()

    t.say("3. bob deploys production: the plan waits for a second person")
    await t.command(f"deploy production {head}", user="bob")
    t.new_messages()
    t.say("   bob tries to approve his own deploy; dave (not an approver) tries; carol approves")
    await t.click("^Approve$", "bob")
    await t.click("^Approve$", "dave")
    await t.click("^Approve$", "carol")
    t.new_messages()

    arm = app.commits["relay-tune"][:7]
    t.say(f"4. someone follows the old runbook by hand: a Mac build of {arm} (arm64 only) into staging's")
    print("   registry, `sed` on the staging overlay, git push, and an Argo CD sync", file=out)
    staging = sandbox.clusters["staging"]
    for image in IMAGES:
        await sandbox.registries.push("staging", image, arm, "arm64", seed=f"mac-{image}:{arm}")
    old = staging.store.get("deployments", "funnelcake", "funnelcake-relay")
    assert old is not None
    overlay = "k8s/applications/funnelcake-{svc}/overlays/staging/kustomization.yaml"
    for svc in ("api", "relay"):
        await asyncio.to_thread(
            push_from_second_clone,
            sandbox.git.gitops.url,
            overlay.format(svc=svc),
            lambda text: re.sub(r"(newTag:\s*['\"]?)[0-9a-f]{7}", rf"\g<1>{arm}", text),
            f"deploy(staging): funnelcake @ {arm} (by hand)",
        )
        staging.store.update(
            "applications",
            "argocd",
            f"funnelcake-{svc}",
            lambda app_obj: app_obj.update({"operation": {"sync": {"revision": "main"}}}),
        )
    await asyncio.sleep(4 * DEMO_TIMINGS.pull_delay + 2 * DEMO_TIMINGS.pull_backoff)
    await t.command("status", user="carol")
    t.new_messages()
    t.say("   carol clicks Roll back: the bot redeploys the last good tag through its own checks")
    await t.click("^Roll back staging$", "carol")
    t.new_messages()

    t.say("5. status again")
    await t.command("status")
    t.new_messages()
    print(f"\n(tour finished in {time.monotonic() - t.started:.0f}s)", file=out)


async def interactive(bot: RunningBot, slack: FakeSlack) -> None:
    t = Tour(bot, slack)
    t.new_messages()
    print(
        "\nType /funnelcake commands (e.g. `/funnelcake plan staging main`), `as bob` to switch user, Ctrl-D to quit."
    )
    user = "alice"
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        line = line.strip()
        if line.startswith("as "):
            user = line[3:].strip() if line[3:].strip() in USERS else user
            print(f"you are {user}")
            continue
        if line.startswith("click "):
            try:
                await t.click(line[6:].strip(), user)
            except LookupError as e:
                print(e)
            t.new_messages()
            continue
        text = line.removeprefix("/funnelcake").strip()
        if text:
            await t.command(text, user)
            t.new_messages()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--interactive", action="store_true", help="after the tour, type commands yourself")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    print(
        "Starting the sandbox: 3 registries, 2 git remotes, 3 simulated clusters, 2 Nostr relays, a local Slack…"
    )
    async with Sandbox(timings=DEMO_TIMINGS) as sandbox:
        slack = FakeSlack()  # Slack's real ~1 message/s per channel
        await slack.start()
        bot = RunningBot(sandbox, slack, reporter_interval=1.0)
        try:
            await bot.start()
            print(
                f"Sandbox up in {time.monotonic() - started:.0f}s; the bot listens on {bot.url}/slack/events"
            )
            await tour(bot, sandbox, slack)
            if args.interactive:
                await interactive(bot, slack)
        finally:
            await bot.stop()
            await slack.stop()
    print(f"\nDemo finished in {time.monotonic() - started:.0f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
