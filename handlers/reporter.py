"""A deploy's Slack thread: one root message kept current with chat.update, a reply per step result.

Slack allows about one message per second per channel, so events are queued and a single worker per
deploy drains them in batches: the step results that piled up become one reply, and the root message
is updated at most once per batch. `emit` never waits on Slack, so a slow or failing Slack cannot slow
or fail a deploy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.ledger.models import DeployRecord
from bot.logs import redact, redact_json
from bot.models import DeployKind, Plan
from bot.pipeline.engine import StepEvent, stopped_by_a_person
from bot.pipeline.events import (
    ApprovalRequested,
    DeploySummary,
    Diagnosed,
    DirtyMigration,
    Resolved,
    Verified,
)
from bot.pipeline.vocab import POST_PUSH_STEPS, EventKind, StepName
from handlers import blocks as bk
from handlers import buttons as drawn
from handlers.directory import mention

log = logging.getLogger(__name__)

BATCH_INTERVAL = 1.0  # seconds between Slack writes of one deploy: Slack's ~1 message/s per channel


class DeployThreads(Protocol):
    """What a thread reads and records of its deploy, through the service (the ledger stays behind it)."""

    async def get_deploy(self, deploy_id: str) -> DeployRecord: ...

    async def record_thread(self, deploy_id: str, channel: str, thread_ts: str) -> DeployRecord: ...


class SlackThreadReporter:
    def __init__(
        self,
        client: AsyncWebClient,
        deploys: DeployThreads,
        record: DeployRecord,
        *,
        interval: float = BATCH_INTERVAL,
        on_close: Callable[[str], None] | None = None,
        approvers: Sequence[str] = (),
        links: bk.Links | None = None,
    ) -> None:
        self.client = client
        self.deploys = deploys
        self.record = record
        self.channel = record.channel or ""
        self.root_ts = record.thread_ts
        self.interval = interval
        self.on_close = on_close
        # principals who may approve this deploy's envs: pinged when it waits
        self.approvers = list(approvers)
        self.links = links
        self.steps: dict[str, str] = {}
        self.current: str | None = None
        self.subject = ""
        self.plan: Plan | None = Plan.from_json(record.plan) if record.plan else None
        self.approval: str | None = None
        self.buttons: list[bk.Block] = [bk.button("Cancel", "cancel", record.id)]
        self.outcome: str | None = None
        self.started = time.monotonic()
        self.queue: asyncio.Queue[StepEvent] = asyncio.Queue()
        self.finished = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def emit(self, event: StepEvent) -> None:
        self.queue.put_nowait(event)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._work(), name=f"slack-thread-{self.record.id}")

    async def flush(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - callers wait for Slack in tests/CLI
        """Wait until every queued event is on Slack."""
        async with asyncio.timeout(timeout):
            await self.queue.join()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _work(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._apply(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not write deploy %s to Slack", self.record.id)
            finally:
                for _ in batch:
                    self.queue.task_done()
            if any(isinstance(e.payload, DeploySummary) for e in batch):
                self.finished.set()
                if self.on_close is not None:
                    self.on_close(self.record.id)
                return
            await asyncio.sleep(self.interval)

    async def _apply(self, batch: list[StepEvent]) -> None:
        await self._ensure_root()
        replies: list[str] = []
        extra: list[bk.Block] = []
        final: tuple[str, bool] | None = None  # the outcome reply, and whether the channel must see it
        ask: str | None = None  # the approvers' ping: its own message
        # a reminder may reach a bot that did not draw the thread: it pings, and leaves the root as it is
        redraw = any(not _is_reminder(e) for e in batch)
        for e in batch:
            if isinstance(e.payload, ApprovalRequested) and e.payload.reminder:
                expires = bk.when(e.payload.expires_at)
                ask = "⏰ " + await self._ask_approvers(f"still waits for one of you and expires {expires}")
                continue
            if isinstance(e.payload, DeploySummary):
                summary = e.payload
                ok = e.kind is EventKind.DONE
                self.outcome = bk.summary_text(summary, ok, e.message, self.links)
                # Roll back only what this run changed: after a deny, an expiry or a failed preflight the env
                # still runs its good tag, and a rollback from there would move it to an older one.
                pushed = bool(summary.pushed) or (
                    self.steps.get(StepName.GITOPS) == "done" or any(s in self.steps for s in POST_PUSH_STEPS)
                )
                self.buttons = (
                    [
                        bk.button(
                            "Roll back",
                            "rollback",
                            drawn.command(f"rollback {self.record.envs[0]}", ran=self.record.short),
                            "danger",
                            confirm=bk.rollback_confirm(self.record.envs[0]),
                        )
                    ]
                    if not ok and pushed
                    else []
                )
                if not ok and not pushed and summary.move_back:
                    self.buttons = [self._move_back_button(summary)]
                # Its own reply, mentioning the requester; a failure is also shown in the channel, where
                # people look (a thread nobody follows is where failures used to go unseen).
                final = (f"{bk.mention(self.record.requester)} {self.outcome}", not ok)
                continue
            if e.step == StepName.APPROVAL:
                self._approval(e)
                if e.kind is EventKind.STARTED:
                    ask = "🙋 " + await self._ask_approvers("waits for one of you")
                continue
            if e.step == StepName.LOCK:
                replies.append(f"🔒 {bk.esc_keep_mentions(e.message)}")
                self.buttons = []
                continue
            if e.step == StepName.RECOVERY and e.kind is EventKind.PROGRESS:
                # Another bot took this deploy over after its bot died: the people watching must see that.
                replies.append(f"♻️ {bk.esc_keep_mentions(e.message)}")
                continue
            if e.kind is EventKind.STARTED:
                self.current = e.step
                continue
            if e.kind is EventKind.PROGRESS:
                continue
            if e.kind is EventKind.RETRYING:
                continue
            self.steps[e.step] = e.kind.value
            if isinstance(e.payload, Resolved):
                self.subject = e.payload.subject
            # a hand-over or a lost lease pauses the step here; the bot that carries on runs it again
            kind = "stopped" if e.kind is EventKind.CANCELLED and not stopped_by_a_person(e) else e.kind.value
            replies.append(bk.step_line(e.step, kind, e.message, e.elapsed))
            if isinstance(e.payload, Verified) and e.kind is EventKind.DONE:
                replies += bk.endpoint_lines(e.payload.endpoint_lines)
            if e.step == StepName.PREFLIGHT and e.kind is EventKind.DONE:
                with contextlib.suppress(Exception):
                    self.record = await self.deploys.get_deploy(self.record.id)
                    self.plan = Plan.from_json(self.record.plan) if self.record.plan else self.plan
            if isinstance(e.payload, Diagnosed):
                diagnosed = e.payload if e.payload.env else replace(e.payload, env=self.record.envs[0])
                extra += bk.diagnosis_blocks(self.record.id, self.record.short, diagnosed)
            if isinstance(e.payload, DirtyMigration):
                env, version = e.payload.env, e.payload.version
                extra += [
                    bk.section(
                        f"🧹 The {bk.esc(env)} database is *dirty at version {version}*: a migration failed half-way.\n"
                        f"Recovery: `force {version}` marks it clean, then `up` runs again. Admins only."
                    ),
                    bk.actions(
                        f"dirty:{self.record.id}",
                        bk.button(
                            f"Force version {version}",
                            "force_migrate",
                            drawn.command(f"migrate {env} force {version}"),
                            "danger",
                            confirm=(
                                f"Mark *{bk.esc(env)}*'s database clean at version {version}, then run `up` again. "
                                "Only after checking what the failed migration left behind."
                            ),
                        ),
                    ),
                ]
        if replies or extra:
            reply_blocks = [bk.section("\n".join(replies))] if replies else []
            await self._post(
                "\n".join(replies) or "diagnosis", blocks=bk.fit(reply_blocks + extra), thread_ts=self.root_ts
            )
        if ask is not None:
            await self._post(ask, blocks=[bk.section(ask)], thread_ts=self.root_ts)
        if final is not None:
            text, broadcast = final
            await self._post(
                text, blocks=[bk.section(text)], thread_ts=self.root_ts, reply_broadcast=broadcast
            )
        if redraw:
            await self._update_root()

    def _move_back_button(self, summary: DeploySummary) -> bk.Block:
        """The second yes a move back needs: the same request again, confirmed, for the state it was refused in."""
        envs = list(summary.envs or self.record.envs)
        env, short = envs[0], str(summary.short or self.record.short)
        if self.record.kind is DeployKind.ROLLBACK:
            label, text = "Roll back anyway", f"rollback {env} --allow-downgrade"
        else:
            label, text = "Move back anyway", f"deploy {','.join(envs)} {short} --allow-downgrade"
        problems = [p.removesuffix(": confirm with --allow-downgrade") for p in summary.move_back]
        what = "\n".join(f"• {bk.esc(p)}" for p in problems)
        ran = summary.rollback_to.get(env)  # what the env ran when it was refused
        return bk.button(
            label,
            "downgrade",
            drawn.command(text, ran=str(ran) if ran else None),
            "danger",
            confirm=f"{what}\nMigrations are never reverted by a move back. Go ahead?",
        )

    def _approval(self, e: StepEvent) -> None:
        if e.kind is EventKind.STARTED:
            asked = e.payload if isinstance(e.payload, ApprovalRequested) else ApprovalRequested()
            self.plan = Plan.from_json(dict(asked.plan)) if asked.plan else self.plan
            expires = bk.when(asked.expires_at)
            self.approval = f"⏳ Waiting for an approver (not the requester) · expires {expires}"
            self.buttons = [
                bk.button("Approve", "approve", self.record.id, "primary"),
                bk.button(
                    "Deny",
                    "deny",
                    self.record.id,
                    "danger",
                    confirm="Deny this deploy? It ends now; nothing is pushed.",
                ),
            ]
        elif e.kind is EventKind.PROGRESS:
            # part of a multi-env request approved: the buttons stay for the other envs' approvers
            self.approval = f"⏳ {_sentence(e.message)}"
        elif e.kind is EventKind.DONE:
            self.approval = f"✅ {_sentence(e.message)} {bk.when(datetime.now(UTC))}"
            self.buttons = [bk.button("Cancel", "cancel", self.record.id)]
        else:
            self.approval = f"⛔ {_sentence(e.message)} {bk.when(datetime.now(UTC))}"
            self.buttons = []

    async def _ask_approvers(self, what: str) -> str:
        """A new message (an edit pings nobody) that mentions whoever may approve."""
        mentions: list[str] = []
        for principal in self.approvers:
            try:
                found = await mention(self.client, principal)
            except SlackApiError as err:
                log.warning("could not look %s up to ping: %s", principal, err.response.get("error"))
                found = None
            if found and found not in mentions:
                mentions.append(found)
        who = " ".join(mentions) or "Approvers"
        return (
            f"{who}: <@{self.record.requester}>'s request for {', '.join(self.record.envs)} {what} "
            "(not the requester): Approve or Deny on the message above."
        )

    async def _ensure_root(self) -> None:
        if self.root_ts:
            return
        resp = await self._post(bk.title(self.record), blocks=self._root_blocks())
        self.root_ts = str(resp["ts"])
        self.record = await self.deploys.record_thread(self.record.id, self.channel, self.root_ts)

    def _root_blocks(self) -> list[bk.Block]:
        state = bk.state_line(self.record, self.steps, self.current, time.monotonic() - self.started)
        return bk.root_blocks(
            self.record,
            links=self.links,
            state=state,
            subject=self.subject,
            plan=self.plan if self.approval else None,
            approval=self.approval,
            buttons=self.buttons,
            outcome=self.outcome,
        )

    async def _update_root(self) -> None:
        if not self.root_ts:
            return
        try:
            await self.client.chat_update(
                channel=self.channel,
                ts=self.root_ts,
                text=redact(self._fallback()),
                blocks=redact_json(self._root_blocks()),
            )
        except SlackApiError as err:
            log.warning("chat.update of deploy %s failed: %s", self.record.id, err.response.get("error"))

    def _fallback(self) -> str:
        """The root's `text`: what notifications and screen readers show, so it carries the outcome too."""
        title = bk.title(self.record)
        if self.outcome:
            return f"{title}: {self.outcome.splitlines()[0].replace('*', '')}"
        if self.approval:
            return f"{title}: waiting for approval"
        return title

    async def _post(self, text: str, *, blocks: list[bk.Block], **kw: Any) -> Any:
        # Step messages quote remote systems (a migrate Job's log, git, Kubernetes): scrub before posting.
        return await self.client.chat_postMessage(
            channel=self.channel, text=redact(text)[:3000], blocks=redact_json(blocks), **kw
        )


def _sentence(message: str) -> str:
    # The service writes these from Slack IDs (`approved by <@U…>`): mentions must stay unescaped.
    return message[:1].upper() + message[1:]


def _is_reminder(e: StepEvent) -> bool:
    return isinstance(e.payload, ApprovalRequested) and e.payload.reminder
