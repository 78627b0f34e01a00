"""One CLI invocation's session: who is asking (the OS user, mapped to a Slack user), its streams, the
service or ledger it opens, and what the authority allows it. Part of bot/cli."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TextIO

from bot.cli.parser import EXIT_FAILED, UsageError
from bot.ledger import Ledger
from bot.ledger.models import DeployRecord
from bot.models import DeployKind
from bot.mrkdwn import SLACK_USER_RE
from bot.pipeline.engine import Reporter
from bot.policy.authz import Action, Authority, GroupCache, Principal
from bot.settings import FunnelcakeConfig, Settings

if TYPE_CHECKING:
    # Only for annotations: the status report, the deploy service and Slack pull in kubernetes_asyncio,
    # the registry clients and slack_sdk, which `history`, `config-check` and `--help` must not pay for.
    from bot.service import DeployService
    from bot.terminal import TerminalReporter
    from handlers.directory import SlackClient
    from handlers.reporter import SlackThreadReporter


class Refused(Exception):
    """The authority said no; exit 3 with its reason."""


def whoami(args: argparse.Namespace, config: FunnelcakeConfig) -> Principal:
    """The OS user running the CLI, mapped to a Slack user by the config's `operators` (or unmapped)."""
    try:
        os_user = pwd.getpwuid(os.getuid()).pw_name  # not $USER: an environment variable is anyone's to set
    except KeyError:
        os_user = str(os.getuid())
    host = socket.gethostname()
    operator = config.operator(os_user)
    as_user = getattr(args, "as_user", None)
    if as_user is not None:
        if operator is None or not operator.impersonate:
            raise Refused(
                f"--as acts as someone else, and the OS user {os_user} may not: only operators with "
                "`impersonate: true` in the environments file may"
            )
        if not SLACK_USER_RE.match(as_user):
            raise UsageError(f"--as takes a Slack user ID (U…), not {as_user[:40]!r}")
        return Principal(as_user, "cli", os_user, host)
    return Principal(operator.slack_user if operator else None, "cli", os_user, host)


async def _by_email(session: Session) -> None:
    """An operator named by e-mail becomes the Slack user with that address (needs SLACK_BOT_TOKEN)."""
    operator = session.config.operator(session.principal.os_user or "")
    if session.principal.user is not None or operator is None or operator.email is None:
        return
    if session.slack is None:
        raise Refused(
            f"the OS user {session.principal.os_user} is mapped by e-mail, and without SLACK_BOT_TOKEN "
            "there is no Slack to look the address up in"
        )
    from handlers.directory import user_by_email  # noqa: PLC0415 - see TYPE_CHECKING above

    user = await user_by_email(session.slack, operator.email)
    if user is None:
        raise Refused(f"no Slack user has the e-mail address {operator.email} that `operators` gives")
    session.principal = replace(session.principal, user=user)


# ---- rendering ----------------------------------------------------------------------------------------


@dataclass
class Session:
    """One invocation: the streams, who is asking, and the deploy started (so Ctrl-C can name it)."""

    settings: Settings
    config: FunnelcakeConfig
    principal: Principal = field(default_factory=lambda: Principal(None, "cli"))
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    reporter: TerminalReporter | None = None
    deploy_id: str | None = None
    stopped: str | None = None  # how Ctrl-C ended the deploy, in the same words as the Slack thread
    slack: SlackClient | None = None
    deploys: DeployService | None = None  # the service of a command that built one
    following: bool = False  # reading another process's progress: Ctrl-C leaves the deploy alone
    threads: dict[str, SlackThreadReporter] = field(default_factory=dict)
    json: bool = False  # --json: stdout carries one JSON document; progress and messages go to stderr

    @property
    def user(self) -> str:
        return self.principal.user or self.principal.name

    @property
    def progress(self) -> TextIO:
        """Where live progress and messages go: stdout, or stderr when stdout is for the JSON document."""
        return self.err if self.json else self.out

    def say(self, *lines: str) -> None:
        stream = self.progress
        for line in lines:
            print(line, file=stream)
        stream.flush()

    def emit(self, doc: dict[str, Any]) -> None:
        """The one JSON document of a --json run."""
        self.out.write(json.dumps(doc, indent=2, default=str) + "\n")
        self.out.flush()

    def fail(self, message: str, hint: str | None = None, code: int = EXIT_FAILED) -> int:
        print(f"error: {message}", file=self.err)
        if hint:
            print(f"hint: {hint}", file=self.err)
        self.err.flush()
        return code

    def reporters(self, record: DeployRecord) -> Sequence[Reporter]:
        out: list[Reporter] = [self.reporter] if self.reporter is not None else []
        if self.slack is not None and self.deploys is not None and record.channel:
            thread = self.threads.get(record.id)
            if thread is None:
                from handlers.reporter import SlackThreadReporter  # noqa: PLC0415 - see TYPE_CHECKING

                thread = self.threads[record.id] = SlackThreadReporter(self.slack, self.deploys, record)
            out.append(thread)
        return out

    @contextlib.asynccontextmanager
    async def service(self) -> AsyncIterator[DeployService]:
        # Imported here: building adapters pulls in kubernetes_asyncio and SQLAlchemy, which
        # `config-check` and `--help` should not pay for; Slack's SDK only when there is a token to use.
        from bot.wiring import build_service  # noqa: PLC0415

        async with contextlib.AsyncExitStack() as stack:
            token = self.settings.slack_bot_token
            if token is not None:
                from handlers.directory import SlackPeople, connect  # noqa: PLC0415 - see TYPE_CHECKING above

                self.slack = await stack.enter_async_context(
                    connect(token.get_secret_value(), self.settings.slack_api_url)
                )
            service = await stack.enter_async_context(
                build_service(self.settings, self.config, reporters=self.reporters)
            )
            self.deploys = service
            if self.slack is not None:
                service.deps.people = SlackPeople(self.slack)  # imported with the token above
            try:
                yield service
            finally:
                for thread in list(self.threads.values()):
                    # the thread shows everything this process reported, then the worker stops
                    with contextlib.suppress(TimeoutError):
                        await thread.flush(timeout=20)
                    await thread.close()

    @contextlib.asynccontextmanager
    async def ledger_only(self) -> AsyncIterator[Ledger]:
        """The ledger alone, for commands that read only it (`history`): no cluster, registry or git client."""
        ledger = await Ledger.open(self.settings.database_url)
        try:
            yield ledger
        finally:
            await ledger.close()

    def authority(self) -> Authority:
        client = self.slack

        async def members(group: str) -> frozenset[str]:
            from handlers.directory import group_members  # noqa: PLC0415 - see TYPE_CHECKING above

            # Without Slack nobody is known to be in a group: only IDs and "*" in the file count.
            return await group_members(client, group) if client is not None else frozenset()

        return Authority(self.config, GroupCache(members))

    async def allow(
        self,
        action: Action,
        envs: Sequence[str],
        *,
        requester: str | None = None,
        lock_holder: str | None = None,
    ) -> None:
        decision = await self.authority().decide(
            action, self.principal, envs, requester=requester, lock_holder=lock_holder
        )
        if not decision.allowed:
            hint = "" if self.slack is not None else " (without SLACK_BOT_TOKEN group membership is unknown)"
            raise Refused(decision.reason + hint)

    def channel_for(self, kind: DeployKind, envs: Sequence[str]) -> str | None:
        """Where a request that needs approval posts it: the first such env's channel, with Slack set up."""
        if self.slack is None or kind is DeployKind.ROLLBACK:
            return None
        return next(
            (e.channel for e in map(self.config.env, envs) if e.approval_required and e.channel), None
        )
