"""The Slack front: parse → authorize → ack → hand to the deploy service, in named background tasks.

Listeners ack at once (Slack's 3 s deadline) and never do the work inline. Bolt's lazy listeners are
avoided on purpose: they deep-copy the client, which breaks the one shared aiohttp session.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from bot import commands
from bot.errors import BotError
from bot.ledger.models import DeployRecord, IncidentRecord
from bot.logs import redact, redact_json
from bot.models import DeployKind
from bot.policy.authz import Action, Authority, GroupCache, Principal
from bot.service import DeployService
from handlers import blocks as bk
from handlers import buttons as drawn
from handlers.directory import SlackPeople, group_members
from handlers.home import home_view
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
        self.signing_secret = signing_secret
        self.authority = Authority(self.config, GroupCache(self._group_members, ttl=group_ttl))
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
        service.deps.people = SlackPeople(client)
        self.app.command("/funnelcake")(self._on_command)
        self.app.event("app_home_opened")(self._on_home_opened)
        self.home_viewers: set[str] = set()  # who opened the Home tab: their board is redrawn as deploys end
        self._open_incidents: frozenset[int] | None = None  # the ids the boards last showed open
        # Buttons repeated in one message carry a suffix (`catchup-staging`): action_ids must be unique there.
        self.app.action(re.compile(rf"^({'|'.join(BUTTON_ACTIONS)})(-[a-z0-9-]+)?$"))(self._on_action)
        # Anything else a signed request can carry gets a clear answer, not Bolt's "unhandled request".
        self.app.action(re.compile(".*"))(self._on_unknown_action)
        self.app.command(re.compile(".*"))(self._on_unknown_command)

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
                self.service,
                record,
                interval=self.reporter_interval,
                on_close=self._reporter_closed,
                links=bk.Links.of(self.config),
                approvers=[
                    p
                    for env in record.envs
                    if self.config.env(env).approval_required
                    for p in self.config.env(env).approvers
                ],
            )
            self.reporters[record.id] = reporter
        return [reporter]

    def _reporter_closed(self, deploy_id: str) -> None:
        self.reporters.pop(deploy_id, None)
        if self.home_viewers:
            self.spawn(self._publish_home(*self.home_viewers), name=f"home-after-{deploy_id}")

    def incidents_changed(self, open_now: Sequence[IncidentRecord]) -> None:
        """The watcher's open incidents after a look: the boards are redrawn when one opened or closed."""
        ids = frozenset(i.id for i in open_now)
        if ids == self._open_incidents:
            return
        self._open_incidents = ids
        if self.home_viewers:
            self.spawn(self._publish_home(*self.home_viewers), name="home-after-incidents")

    async def _on_home_opened(self, event: dict[str, Any]) -> None:
        user = str(event.get("user") or "")
        if event.get("tab", "home") != "home" or not user.startswith(("U", "W")):
            return
        self.home_viewers.add(user)
        self.spawn(self._publish_home(user), name=f"home-{user}")

    async def _publish_home(self, *users: str) -> None:
        view = redact_json(await home_view(self.service))
        for user in users:
            try:
                async with asyncio.timeout(10):
                    await self.client.views_publish(user_id=user, view=view)
            except (SlackApiError, TimeoutError, aiohttp.ClientError) as e:
                log.warning("could not publish the Home tab of %s: %s", user, type(e).__name__)

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
        return await group_members(self.client, group)

    async def _tell(self, asker: Asker, text: str, blocks: list[bk.Block] | None = None) -> None:
        """A private message only the asker sees: refusals, errors, dry runs. Through the request's
        response_url when it has one (that works in channels the bot was never invited to)."""
        text, payload = redact(text)[:3000], redact_json(blocks)
        if asker.response_url:
            try:
                async with asyncio.timeout(10):
                    resp = await AsyncWebhookClient(asker.response_url, session=self.client.session).send(
                        text=text, blocks=payload, response_type="ephemeral", replace_original=False
                    )
                if resp.status_code == 200:
                    return
                log.warning("response_url answered %d; telling %s directly", resp.status_code, asker.user)
            except (TimeoutError, aiohttp.ClientError) as e:
                log.warning("response_url failed (%s); telling %s directly", type(e).__name__, asker.user)
        try:
            await self.client.chat_postEphemeral(
                channel=asker.channel, user=asker.user, text=text, blocks=payload
            )
        except SlackApiError as e:
            log.warning("could not tell %s: %s", asker.user, e.response.get("error"))

    async def _guard(self, asker: Asker, coro: Coroutine[Any, Any, None]) -> None:
        """Run one user request; any refusal or failure becomes a message to that user, never a traceback."""
        try:
            await coro
        except BotError as e:
            # Mentions the bot wrote resolve; anything a user typed (a lock reason, a ref) stays text.
            hint = f"\n_{bk.esc_keep_mentions(e.hint)}_" if e.hint else ""
            await self._tell(asker, f"❌ {bk.esc_keep_mentions(e.message)}{hint}")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request from %s failed", asker.user)
            await self._tell(asker, "❌ Internal error in the bot; the logs have the details.")

    async def _allow(
        self,
        action: Action,
        asker: Asker,
        envs: Sequence[str],
        *,
        requester: str | None = None,
        lock_holder: str | None = None,
    ) -> bool:
        """Ask the one authority; a refusal is told privately and nothing else happens."""
        decision = await self.authority.decide(
            action, asker.principal, envs, requester=requester, lock_holder=lock_holder
        )
        if not decision.allowed:
            await self._tell(asker, f"🚫 Not allowed: {bk.esc_keep_mentions(decision.reason)}.")
        return decision.allowed

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
        asker = Asker(
            str(command.get("user_id", "")),
            str(command.get("channel_id", "")),
            _str_or_none(command.get("response_url")),
        )
        name = f"command-{type(parsed).__name__.lower()}-{asker.user}"
        self.spawn(self._guard(asker, self._run(parsed, asker)), name=name)

    async def _run(self, cmd: commands.Command, asker: Asker, *, rebuild: bool = False) -> None:
        svc, user, channel = self.service, asker.user, asker.channel
        match cmd:
            case commands.Deploy(envs=envs, ref=ref, dry_run=False, allow_downgrade=allow, override=override):
                action = Action.REBUILD if rebuild else Action.DEPLOY
                if not await self._allow(action, asker, envs):
                    return
                # going past a promotion gate is an admin's decision, as forcing a migration version is
                if override and not await self._allow(Action.FORCE, asker, envs):
                    return
                await svc.admit(DeployKind.DEPLOY, envs, ref)
                await svc.start(
                    DeployKind.DEPLOY,
                    list(envs),
                    ref,
                    user,
                    channel=channel,
                    rebuild=rebuild,
                    origin=ORIGIN,
                    allow_downgrade=allow,
                    override_reason=override,
                )
            case (
                commands.Deploy(envs=envs, ref=ref, allow_downgrade=allow, override=override)
                | commands.PlanCommand(envs=envs, ref=ref, allow_downgrade=allow, override=override)
            ):
                if not await self._allow(Action.PLAN, asker, envs):
                    return
                plan, result = await svc.plan(
                    list(envs), ref, user, allow_downgrade=allow, override_reason=override
                )
                failed = result.failed
                text = f"📝 Plan for {', '.join(envs)} @ `{plan.commit.short if plan else ref}` (nothing was changed)"
                blocks = [bk.section(text), *(bk.plan_blocks(plan) if plan else [])]
                if failed is not None and not (plan and plan.problems):
                    blocks.append(bk.section(f"❌ {failed.step}: {bk.esc_keep_mentions(failed.message)}"))
                await self._tell(asker, text, bk.fit(blocks))
            case commands.Status():
                if await self._allow(Action.STATUS, asker, []):
                    report = await svc.status()
                    await self.client.chat_postMessage(
                        channel=channel,
                        text="funnelcake status",
                        blocks=redact_json(bk.status_blocks(report)),
                    )
            case commands.MigrateCommand(env=env, force_version=None, ref=ref):
                if await self._allow(Action.MIGRATE, asker, [env]):
                    await svc.admit(DeployKind.MIGRATE, [env], ref)
                    await svc.start(
                        DeployKind.MIGRATE, [env], ref or "", user, channel=channel, origin=ORIGIN
                    )
            case commands.MigrateCommand(env=env, force_version=int(version)):
                if await self._allow(Action.FORCE, asker, [env]):
                    await svc.admit(DeployKind.FORCE_MIGRATE, [env], None)
                    await svc.start_force(env, version, user, channel=channel, origin=ORIGIN)
            case commands.Rollback(env=env, allow_downgrade=allow):
                if await self._allow(Action.ROLLBACK, asker, [env]):
                    await svc.admit(DeployKind.ROLLBACK, [env], None)
                    await svc.start_rollback(env, user, channel=channel, origin=ORIGIN, allow_downgrade=allow)
            case commands.History(env=env, limit=limit, before=before):
                if await self._allow(Action.HISTORY, asker, [env] if env else []):
                    records, more = await svc.history_page(env, limit, before=before)
                    later = commands.next_history(cmd, records[-1].id) if more else None
                    await self._tell(asker, "History", bk.history_blocks(records, more=later))
            case commands.Lock(env=env, reason=reason):
                if await self._allow(Action.LOCK, asker, [env]):
                    await svc.lock(env, user, reason)
                    await self.client.chat_postMessage(
                        channel=channel,
                        text=redact(f"🔒 {env} locked by {bk.mention(user)}: {bk.esc(reason)}"),
                    )
            case commands.Unlock(env=env):
                held = await svc.lock_on(env)
                if await self._allow(Action.UNLOCK, asker, [env], lock_holder=held.user if held else None):
                    lock = await svc.unlock(env, user)
                    text = f"🔓 {env} unlocked by {bk.mention(user)}" if lock else f"{env} was not locked."
                    await self.client.chat_postMessage(channel=channel, text=text)

    # ---- buttons --------------------------------------------------------------------------------

    async def _on_action(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        actions, user = body.get("actions"), body.get("user")
        action = actions[0] if isinstance(actions, list) and actions else None
        user_id = user.get("id") if isinstance(user, dict) else None
        if not isinstance(action, dict) or not isinstance(user_id, str):
            log.warning("ignored a button payload without an action or a user")
            return
        asker = Asker(
            user_id,
            str(_dict(body.get("channel")).get("id") or _dict(body.get("container")).get("channel_id") or ""),
            _str_or_none(body.get("response_url")),
        )
        action_id = str(action.get("action_id", "")).split("-", 1)[0]
        value = action.get("value")
        self.spawn(
            self._guard(asker, self._click(action_id, value if isinstance(value, str) else "", asker)),
            name=f"action-{action_id}-{user_id}",
        )

    async def _on_unknown_action(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        user = _dict(body.get("user")).get("id")
        if isinstance(user, str) and user:
            channel = str(_dict(body.get("channel")).get("id") or "")
            await self._tell(Asker(user, channel, _str_or_none(body.get("response_url"))), STALE_BUTTON)

    async def _on_unknown_command(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        await ack(text="This app only answers `/funnelcake`; try `/funnelcake help`.")

    async def _click(self, action_id: str, value: str, asker: Asker) -> None:
        if action_id in ("approve", "deny", "cancel"):
            deploy_id = drawn.deploy_id(value)
            if deploy_id is None:
                await self._tell(asker, STALE_BUTTON)
                return
            if action_id == "cancel":
                await self._cancel(deploy_id, asker)
            else:
                await self._decide(deploy_id, asker, approve=action_id == "approve")
            return
        button = drawn.read(value)
        parsed = _button_command(action_id, button.command, self.config.env_names) if button else None
        if button is None or parsed is None:
            await self._tell(asker, STALE_BUTTON)
            return
        env = parsed.envs[0] if isinstance(parsed, commands.Deploy) else parsed.env
        if button.ran is not None:
            now = await self.service.current_tag(env)
            if now != button.ran:
                await self._tell(
                    asker,
                    f"⚠️ {env} moved from `{button.ran}` to `{now or 'nothing'}` since this message; "
                    "nothing was done. Run `/funnelcake status` again.",
                )
                return
        await self._run(parsed, asker, rebuild=action_id == "rebuild")

    async def _decide(self, deploy_id: str, asker: Asker, *, approve: bool) -> None:
        record = await self.service.get_deploy(deploy_id)
        action = Action.APPROVE if approve else Action.DENY
        if not await self._allow(action, asker, record.envs, requester=record.requester):
            return
        # Which of the envs needing approval this approver covers, asked of Slack now (not the cache).
        mine = [
            e.name
            for e in self.authority.approval_envs(record.envs)
            if await self.authority.approves(e, asker.user)
        ]
        await self.service.decide(deploy_id, asker.user, approve=approve, envs=mine)

    async def _cancel(self, deploy_id: str, asker: Asker) -> None:
        """Stop a deploy: its requester, a deployer of every env it touches, or an admin of one of them."""
        svc = self.service
        record = await svc.get_deploy(deploy_id)
        if record.state.terminal:
            await self._tell(asker, f"That deploy already ended: {record.state.value}.")
            return
        if not await self._allow(Action.CANCEL, asker, record.envs, requester=record.requester):
            return
        ended = await svc.cancel(deploy_id, asker.user)
        if ended.state.terminal:
            await self._tell(asker, f"🛑 {ended.message or 'Cancelled.'}")
        else:
            await self._tell(
                asker,
                "🛑 Cancel requested: the bot running it stops it within seconds; the thread says where.",
            )


ORIGIN = "slack"
# The buttons the bot draws; Approve, Deny and Cancel carry a deploy id, the others a command (`_button_command`).
BUTTON_ACTIONS = ("approve", "deny", "cancel", "rollback", "rebuild", "catchup", "force_migrate", "downgrade")
STALE_BUTTON = (
    "⚠️ This button's value is not one the bot drew, so nothing was done. "
    "Run `/funnelcake status` (or open the deploy's thread) for current buttons."
)


@dataclass(frozen=True)
class Asker:
    """Who clicked or typed, where, and the request's response_url for private answers."""

    user: str
    channel: str
    response_url: str | None

    @property
    def principal(self) -> Principal:
        return Principal(self.user)


def _button_command(
    action_id: str, text: str, env_names: Sequence[str]
) -> commands.Deploy | commands.Rollback | commands.MigrateCommand | None:
    """A button's command through the typed grammar; only the command that button stands for."""
    parsed = commands.parse(text, env_names)
    if action_id == "rollback" and isinstance(parsed, commands.Rollback):
        return parsed
    if action_id in ("catchup", "rebuild") and isinstance(parsed, commands.Deploy):
        return parsed if not parsed.dry_run and len(parsed.envs) == 1 else None
    if action_id == "downgrade" and isinstance(parsed, commands.Deploy | commands.Rollback):
        # the second yes to a move back: only ever the request it was drawn for, confirmed
        return parsed if parsed.allow_downgrade and not getattr(parsed, "dry_run", False) else None
    if action_id == "force_migrate" and isinstance(parsed, commands.MigrateCommand):
        return parsed if parsed.force_version is not None else None
    return None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
