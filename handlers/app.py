"""The Slack front: parse → authorize → ack → hand to the deploy service, in named background tasks.

Listeners ack at once (Slack's 3 s deadline) and never do the work inline. Bolt's lazy listeners are
avoided on purpose: they deep-copy the client, which breaks the one shared aiohttp session.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine
from typing import Any

from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot import commands
from bot.errors import BotError
from bot.ledger.models import DeployKind, DeployRecord, who
from bot.logs import redact, redact_json
from bot.policy.rbac import Decision, GroupCache, Policy
from bot.service import DeployService, Started
from handlers import blocks as bk
from handlers.reporter import SlackThreadReporter

log = logging.getLogger(__name__)


class SlackFront:
    def __init__(
        self,
        service: DeployService,
        client: AsyncWebClient,
        *,
        signing_secret: str | None,
        group_ttl: float = 300.0,
        reporter_interval: float = 1.0,
    ) -> None:
        self.service = service
        self.client = client
        self.config = service.config
        self.policy = Policy(self.config, GroupCache(self._group_members, ttl=group_ttl))
        self.reporter_interval = reporter_interval
        self.tasks: set[asyncio.Task[Any]] = set()
        self.reporters: dict[str, SlackThreadReporter] = {}
        self.app = AsyncApp(
            client=client,
            signing_secret=signing_secret,
            request_verification_enabled=signing_secret is not None,
            process_before_response=False,
        )
        service.reporters = self.reporters_for
        self.app.command("/funnelcake")(self._on_command)
        # Buttons repeated in one message carry a suffix (`catchup-staging`): action_ids must be unique there.
        self.app.action(
            re.compile(r"^(approve|deny|cancel|rollback|rebuild|catchup|force_migrate)(-[a-z0-9-]+)?$")
        )(self._on_action)

    # ---- plumbing -------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def reporters_for(self, record: DeployRecord) -> list[SlackThreadReporter]:
        if not record.channel:
            return []
        reporter = self.reporters.get(record.id)
        if reporter is None:
            reporter = SlackThreadReporter(
                self.client,
                self.service.deps.ledger,
                record,
                interval=self.reporter_interval,
                on_close=self._reporter_closed,
            )
            self.reporters[record.id] = reporter
        return [reporter]

    def _reporter_closed(self, deploy_id: str) -> None:
        self.reporters.pop(deploy_id, None)

    async def flush(self) -> None:
        """Wait until every deploy's queued Slack writes are done (tests, shutdown)."""
        for reporter in list(self.reporters.values()):
            await reporter.flush()

    async def shutdown(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for reporter in list(self.reporters.values()):
            await reporter.close()

    async def _group_members(self, group: str) -> frozenset[str]:
        group_id = group
        if group.startswith("@"):
            listing = await self.client.usergroups_list()
            groups: list[dict[str, Any]] = listing.get("usergroups", [])
            found = [str(g["id"]) for g in groups if g.get("handle") == group[1:]]
            if not found:
                log.warning("user group %s does not exist in this workspace", group)
                return frozenset()
            group_id = found[0]
        resp = await self.client.usergroups_users_list(usergroup=group_id)
        return frozenset(resp.get("users", []))

    async def _tell(self, channel: str, user: str, text: str, blocks: list[bk.Block] | None = None) -> None:
        """An ephemeral message only `user` sees: refusals, errors, dry runs."""
        try:
            await self.client.chat_postEphemeral(
                channel=channel, user=user, text=redact(text)[:3000], blocks=redact_json(blocks)
            )
        except SlackApiError as e:
            log.warning("could not tell %s: %s", user, e.response.get("error"))

    async def _guard(self, channel: str, user: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run one user request; any refusal or failure becomes a message to that user, never a traceback."""
        try:
            await coro
        except BotError as e:
            await self._tell(channel, user, f"❌ {e.message}" + (f"\n_{e.hint}_" if e.hint else ""))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request from %s failed", user)
            await self._tell(channel, user, "❌ Internal error in the bot; the logs have the details.")

    async def _refuse(self, decision: Decision, channel: str, user: str) -> bool:
        if not decision.allowed:
            await self._tell(channel, user, f"🚫 Not allowed: {decision.reason}.")
            return True
        return False

    # ---- slash command --------------------------------------------------------------------------

    async def _on_command(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        parsed = commands.parse(str(command.get("text", "")), self.config.env_names)
        if isinstance(parsed, commands.Usage):
            await ack(text=redact(parsed.message))  # it may quote what the user typed
            return
        if isinstance(parsed, commands.Help):
            await ack(text=commands.help_text(parsed.topic, self.config.env_names))
            return
        await ack(text="⏳ Working on it…")
        user, channel = str(command["user_id"]), str(command["channel_id"])
        name = f"command-{type(parsed).__name__.lower()}-{user}"
        self.spawn(self._guard(channel, user, self._run(parsed, user, channel)), name=name)

    async def _run(self, cmd: commands.Command, user: str, channel: str) -> None:
        svc = self.service
        match cmd:
            case commands.Deploy(envs=envs, ref=ref, dry_run=False, allow_downgrade=allow, override=override):
                for env in envs:
                    if await self._refuse(
                        await self.policy.can_deploy(self.config.env(env), user), channel, user
                    ):
                        return
                    # going past a promotion gate is an admin's decision
                    if override and await self._refuse(
                        await self.policy.can_admin(self.config.env(env), user), channel, user
                    ):
                        return
                await svc.start(
                    DeployKind.DEPLOY,
                    list(envs),
                    ref,
                    user,
                    channel=channel,
                    allow_downgrade=allow,
                    override_reason=override,
                )
            case (
                commands.Deploy(envs=envs, ref=ref, allow_downgrade=allow, override=override)
                | commands.Plan(envs=envs, ref=ref, allow_downgrade=allow, override=override)
            ):
                plan, result = await svc.plan(
                    list(envs), ref, user, allow_downgrade=allow, override_reason=override
                )
                failed = result.failed
                text = f"📝 Plan for {', '.join(envs)} @ `{plan.commit.short if plan else ref}` (nothing was changed)"
                blocks = [bk.section(text), *(bk.plan_blocks(plan) if plan else [])]
                if failed is not None and not (plan and plan.problems):
                    blocks.append(bk.section(f"❌ {failed.step}: {bk.esc(failed.message)}"))
                await self._tell(channel, user, text, bk.fit(blocks))
            case commands.Status():
                report = await svc.status()
                await self.client.chat_postMessage(
                    channel=channel, text="funnelcake status", blocks=redact_json(bk.status_blocks(report))
                )
            case commands.Migrate(env=env, force_version=None, ref=ref):
                if await self._refuse(
                    await self.policy.can_deploy(self.config.env(env), user), channel, user
                ):
                    return
                await svc.start(DeployKind.MIGRATE, [env], ref or "", user, channel=channel)
            case commands.Migrate(env=env, force_version=int(version)):
                await self._force(env, version, user, channel)
            case commands.Rollback(env=env, allow_downgrade=allow):
                await self._rollback(env, user, channel, allow_downgrade=allow)
            case commands.History(env=env, limit=limit):
                records = await svc.history(env, limit)
                await self._tell(channel, user, "History", bk.history_blocks(records))
            case commands.Lock(env=env, reason=reason):
                if await self._refuse(
                    await self.policy.can_deploy(self.config.env(env), user), channel, user
                ):
                    return
                await svc.lock(env, user, reason)
                await self.client.chat_postMessage(
                    channel=channel, text=redact(f"🔒 {env} locked by {bk.mention(user)}: {bk.esc(reason)}")
                )
            case commands.Unlock(env=env):
                await self._unlock(env, user, channel)

    async def _rollback(
        self, env: str, user: str, channel: str, *, allow_downgrade: bool = False
    ) -> Started | None:
        if await self._refuse(await self.policy.can_deploy(self.config.env(env), user), channel, user):
            return None
        return await self.service.start_rollback(env, user, channel=channel, allow_downgrade=allow_downgrade)

    async def _force(self, env: str, version: int, user: str, channel: str) -> None:
        if await self._refuse(await self.policy.can_admin(self.config.env(env), user), channel, user):
            return
        await self.service.start_force(env, version, user, channel=channel)

    async def _unlock(self, env: str, user: str, channel: str) -> None:
        held = [lock for lock in await self.service.deps.ledger.locks() if lock.env == env]
        if held and held[0].user != user:
            decision = await self.policy.can_admin(self.config.env(env), user)
            if await self._refuse(decision, channel, user):
                return
        lock = await self.service.unlock(env, user)
        text = f"🔓 {env} unlocked by {bk.mention(user)}" if lock else f"{env} was not locked."
        await self.client.chat_postMessage(channel=channel, text=text)

    # ---- buttons --------------------------------------------------------------------------------

    async def _on_action(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        action = body["actions"][0]
        user = str(body["user"]["id"])
        channel = str(
            (body.get("channel") or {}).get("id") or (body.get("container") or {}).get("channel_id")
        )
        action_id, value = str(action["action_id"]).split("-", 1)[0], str(action.get("value", ""))
        self.spawn(
            self._guard(channel, user, self._click(action_id, value, user, channel)),
            name=f"action-{action_id}-{user}",
        )

    async def _cancel(self, deploy_id: str, user: str, channel: str) -> None:
        """Stop a deploy: its requester, a deployer of every env it touches, or an admin of one of them."""
        svc = self.service
        record = await svc.deps.ledger.get_deploy(deploy_id)
        if record.state.terminal:
            await self._tell(channel, user, f"That deploy already ended: {record.state.value}.")
            return
        if user != record.requester:
            envs = [self.config.env(e) for e in record.envs]
            deployer = [await self.policy.can_deploy(env, user) for env in envs]
            admin = [await self.policy.can_admin(env, user) for env in envs]
            if not all(d.allowed for d in deployer) and not any(a.allowed for a in admin):
                refusal = next(d for d in deployer if not d.allowed)
                await self._tell(
                    channel,
                    user,
                    f"🚫 Not allowed: only its requester {who(record.requester)}, the deployers of "
                    f"{', '.join(record.envs)} or an admin may cancel it ({refusal.reason}).",
                )
                return
        ended = await svc.cancel(deploy_id, user)
        if ended.state.terminal:
            await self._tell(channel, user, f"🛑 {ended.message or 'Cancelled.'}")
        else:
            await self._tell(
                channel,
                user,
                "🛑 Cancel requested: the bot running it stops it within seconds; the thread says where.",
            )

    async def _click(self, action_id: str, value: str, user: str, channel: str) -> None:
        svc = self.service
        if action_id in ("approve", "deny"):
            record = await svc.deps.ledger.get_deploy(value)
            # Approving takes an approver; denying, an approver or the requester withdrawing it.
            if action_id == "approve" or user != record.requester:
                for env in record.envs:
                    if await self._refuse(
                        await self.policy.can_approve(self.config.env(env), user), channel, user
                    ):
                        return
            await svc.decide(value, user, approve=action_id == "approve")
        elif action_id == "cancel":
            await self._cancel(value, user, channel)
        elif action_id == "rollback":
            await self._rollback(value, user, channel)
        elif action_id in ("rebuild", "catchup"):
            env, short = value.split(":", 1)
            if await self._refuse(await self.policy.can_deploy(self.config.env(env), user), channel, user):
                return
            await svc.start(
                DeployKind.DEPLOY, [env], short, user, channel=channel, rebuild=action_id == "rebuild"
            )
        elif action_id == "force_migrate":
            env, version = value.split(":", 1)
            await self._force(env, int(version), user, channel)
