"""Running each CLI command: the deploy and its confirmation, following and waiting, approve and deny,
and the exit code each ends with. Part of bot/cli."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from bot import commands
from bot.cli.parser import (
    EXIT_ENDED,
    EXIT_FAILED,
    EXIT_OK,
    FOLLOW_EVERY,
    PROG,
    UsageError,
)
from bot.cli.render import (
    _has_findings,
    history_json,
    record_json,
    render_history,
    render_plan,
    render_status,
    status_json,
)
from bot.cli.session import Session, _by_email
from bot.colour import colour_enabled
from bot.errors import BotError
from bot.ledger.models import DeployRecord, DeployState, when, who
from bot.models import DeployKind
from bot.pipeline.vocab import EXECUTE_STEPS, PLAN_STEPS, RUN_STEPS, StepName
from bot.policy.authz import Action
from bot.settings import FunnelcakeConfig

if TYPE_CHECKING:
    # Only for annotations: the deploy service pulls in kubernetes_asyncio and the registry clients, and the
    # live deploy display the pipeline; `history`, `config-check` and `--help` need neither.
    from bot.pipeline.engine import PipelineResult
    from bot.service import DeployService
    from bot.terminal import TerminalReporter


def _steps(kind: DeployKind, envs: Sequence[str], config: FunnelcakeConfig) -> list[str]:
    """The step lines a terminal shows for a run: its plan, then an approval wait or what it executes."""
    if kind is not DeployKind.ROLLBACK and any(config.env(e).approval_required for e in envs):
        return [*PLAN_STEPS, StepName.APPROVAL]
    return list(RUN_STEPS[kind])


async def _ask(session: Session, question: str) -> bool:
    """A yes/no answer from the terminal, read through the loop so Ctrl-C still cancels cleanly."""
    session.progress.write(question)
    session.progress.flush()
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()
    fd = sys.stdin.fileno()

    def readable() -> None:
        if not answer.done():
            answer.set_result(sys.stdin.readline())

    loop.add_reader(fd, readable)
    try:
        text = await answer
    finally:
        loop.remove_reader(fd)
    return text.strip().casefold() in ("y", "yes")


async def _show_plan(
    session: Session,
    service: DeployService,
    envs: Sequence[str],
    ref: str,
    *,
    allow_downgrade: bool = False,
    override: str | None = None,
    json_doc: bool = False,
) -> int:
    plan, result = await service.plan(
        envs, ref, session.user, allow_downgrade=allow_downgrade, override_reason=override
    )
    if plan is not None:
        session.say(*render_plan(plan))
    code = _plan_verdict(session, result)
    if json_doc:
        failed = result.failed
        session.emit(
            {
                "ok": code == EXIT_OK,
                "plan": plan.to_json() if plan is not None else None,
                "failed": (
                    {"step": failed.step, "message": failed.message, "hint": failed.hint} if failed else None
                ),
                "exit_code": code,
            }
        )
    return code


def _plan_verdict(session: Session, result: PipelineResult) -> int:
    failed = result.failed
    if failed is None:
        return EXIT_OK
    return session.fail(f"{failed.step}: {failed.message}", failed.hint)


async def _run_deploy(
    session: Session,
    service: DeployService,
    kind: DeployKind,
    envs: Sequence[str],
    ref: str | None,
    *,
    wait: bool = False,
    allow_downgrade: bool = False,
    override: str | None = None,
) -> int:
    target = ", ".join(envs)
    await service.admit(kind, envs, ref)
    from bot.terminal import TerminalReporter  # noqa: PLC0415 - see TYPE_CHECKING above

    reporter = TerminalReporter(
        _steps(kind, envs, session.config),
        title=f"{kind.value} {ref or ''} → {target}",
        stream=session.progress,
    )
    session.reporter = reporter
    channel = session.channel_for(kind, envs)
    origin = session.principal.origin
    async with reporter:
        if ref is None:
            started = await service.start_rollback(
                envs[0], session.user, channel=channel, origin=origin, allow_downgrade=allow_downgrade
            )
        else:
            started = await service.start(
                kind,
                envs,
                ref,
                session.user,
                channel=channel,
                origin=origin,
                allow_downgrade=allow_downgrade,
                override_reason=override,
            )
        reporter.title = f"{kind.value} {started.record.ref} → {target} ({started.record.id})"
        session.deploy_id = started.record.id
        await _wait_cancelling_on_ctrl_c(session, service, started.record.id, started.task)
        record = await service.wait(started.record.id)
    if record.state is DeployState.AWAITING_APPROVAL:
        session.say(*_awaiting(session, record))
        if wait:
            record = await _follow(session, service, record)
    return _outcome(session, record)


async def _wait_cancelling_on_ctrl_c(
    session: Session, service: DeployService, deploy_id: str, task: asyncio.Task[DeployRecord]
) -> None:
    try:
        # Not service.wait(): it swallows the waiter's own cancellation, and Ctrl-C must get through.
        await asyncio.wait({task})
    except asyncio.CancelledError:
        # Ctrl-C: a cancel by this user, through the same path (and words) as the Slack Cancel button.
        with contextlib.suppress(BotError):
            ended = await asyncio.shield(service.cancel(deploy_id, session.user))
            session.stopped = ended.message
        raise


async def _follow(session: Session, service: DeployService, record: DeployRecord) -> DeployRecord:
    """Read the deploy from the ledger until it ends, whichever bot runs it once approved."""
    session.following = True
    seen = record.state
    while not record.state.terminal:
        await asyncio.sleep(FOLLOW_EVERY)
        record = await service.get_deploy(record.id)
        if record.state is not seen:
            seen = record.state
            by = f" (approved by {who(record.approver)})" if record.approver else ""
            session.say(f"{record.id}: {record.state.value}{by}")
    return record


def _awaiting(session: Session, record: DeployRecord) -> list[str]:
    expires = _approval_expiry(session.reporter)
    where = f" in Slack (the request is in <#{record.channel}>)" if record.channel else ""
    return [
        f"{record.kind.value} {record.id} ({record.short or record.ref} → {', '.join(record.envs)}): "
        "awaiting approval.",
        f"A second person must approve it{where} or with `{PROG} approve {record.id}`; nothing is changed "
        "until then" + (f" (the request expires at {when(expires)})." if expires else "."),
    ]


def _approval_expiry(reporter: TerminalReporter | None) -> datetime | None:
    raw = reporter.approval.expires_at if reporter and reporter.approval else None
    try:
        return datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


def _outcome(session: Session, record: DeployRecord) -> int:
    code = _outcome_code(session, record)
    if session.json:
        failure = session.reporter.failure if session.reporter else None
        session.emit(
            {
                "ok": code == EXIT_OK,
                "deploy": record_json(record),
                "failed": (
                    {"step": failure.step, "message": failure.message, "hint": failure.hint}
                    if failure and record.state is not DeployState.SUCCEEDED
                    else None
                ),
                "exit_code": code,
            }
        )
    return code


def _outcome_code(session: Session, record: DeployRecord) -> int:
    what = f"{record.kind.value} {record.id} ({record.short or record.ref} → {', '.join(record.envs)})"
    took = ""
    if record.finished_at is not None:
        took = f" in {(record.finished_at - record.created_at).total_seconds():.1f}s"
    if record.state is DeployState.SUCCEEDED:
        session.say(f"{what} succeeded{took}")
        return EXIT_OK
    if record.state is DeployState.AWAITING_APPROVAL:
        return EXIT_OK
    failure = session.reporter.failure if session.reporter else None
    hint = failure.hint if failure else None
    if hint is None:
        scope = f" {record.envs[0]}" if len(record.envs) == 1 else ""
        hint = f"The steps above show where it stopped; `{PROG} history{scope}` lists the deploys."
    code = EXIT_ENDED if record.state in (DeployState.DENIED, DeployState.EXPIRED) else EXIT_FAILED
    return session.fail(f"{what} {record.state.value}: {record.message or 'no message recorded'}", hint, code)


async def _decide(session: Session, service: DeployService, deploy_id: str, *, approve: bool) -> int:
    """`approve`/`deny ID`: the rules of the Slack buttons; an approved deploy runs here, shown live."""
    if not commands.DEPLOY_ID_RE.match(deploy_id):
        raise UsageError(f"{deploy_id[:40]!r} is not a deploy id: `{PROG} history` lists them")
    record = await service.get_deploy(deploy_id)
    await session.allow(Action.APPROVE if approve else Action.DENY, record.envs, requester=record.requester)
    authority = session.authority()
    mine = [e.name for e in authority.approval_envs(record.envs) if await authority.approves(e, session.user)]

    from bot.terminal import TerminalReporter  # noqa: PLC0415 - see TYPE_CHECKING above

    reporter = TerminalReporter(
        list(EXECUTE_STEPS),
        title=f"{record.kind.value} {record.ref} → {', '.join(record.envs)} ({record.id})",
        stream=session.progress,
    )
    session.reporter = reporter
    session.deploy_id = deploy_id
    async with reporter:
        await service.decide(deploy_id, session.user, approve=approve, envs=mine)
        task = service.task(deploy_id)
        if task is not None:
            await _wait_cancelling_on_ctrl_c(session, service, deploy_id, task)
        record = await service.wait(deploy_id)
    if record.state is DeployState.AWAITING_APPROVAL:
        session.say(
            f"{deploy_id}: your approval is recorded; it still waits for the other environments' approvers"
        )
        return _emitted(session, record, EXIT_OK)
    if record.state is DeployState.DENIED:
        session.say(f"{deploy_id}: {record.message or 'denied'}")
        return _emitted(session, record, EXIT_OK)
    return _outcome(session, record)


def _emitted(session: Session, record: DeployRecord, code: int) -> int:
    if session.json:
        session.emit(
            {"ok": code == EXIT_OK, "deploy": record_json(record), "failed": None, "exit_code": code}
        )
    return code


def _reads_only(cmd: commands.Command | None) -> bool:
    if isinstance(cmd, commands.Deploy):
        return cmd.dry_run
    return isinstance(cmd, (commands.Status, commands.History, commands.PlanCommand))


async def _dispatch(session: Session, args: argparse.Namespace, cmd: commands.Command | None) -> int:
    operator = session.config.operator(session.principal.os_user or "")
    if session.principal.user is None and not _reads_only(cmd) and not (operator and operator.email):
        # Whoever no operator maps may only read: refused before anything is opened.
        await session.allow(Action.DEPLOY, [])
    if isinstance(cmd, commands.History):
        await session.allow(Action.HISTORY, [cmd.env] if cmd.env else [])
        async with session.ledger_only() as ledger:
            records, more = await ledger.history_page(cmd.env, cmd.limit, before=cmd.before)
        older = records[-1].id if more and records else None
        if session.json:
            session.emit(history_json(records, older))
        else:
            session.say(*render_history(records, more=commands.next_history(cmd, older) if older else None))
        return EXIT_OK
    async with session.service() as service:
        if not _reads_only(cmd):
            await _by_email(session)
        if cmd is None:
            return await _decide(session, service, args.deploy_id, approve=args.command == "approve")
        if isinstance(cmd, commands.PlanCommand) or (isinstance(cmd, commands.Deploy) and cmd.dry_run):
            await session.allow(Action.PLAN, cmd.envs)
            return await _show_plan(
                session,
                service,
                cmd.envs,
                cmd.ref,
                allow_downgrade=cmd.allow_downgrade,
                override=cmd.override,
                json_doc=session.json,
            )
        if isinstance(cmd, commands.Deploy):
            await session.allow(Action.DEPLOY, cmd.envs)
            allow, override = cmd.allow_downgrade, cmd.override
            if override:  # going past a promotion gate is an admin's decision, as forcing a migration is
                await session.allow(Action.FORCE, cmd.envs)
            if not args.yes:
                code = await _show_plan(
                    session, service, cmd.envs, cmd.ref, allow_downgrade=allow, override=override
                )
                if code != EXIT_OK:
                    return code
                if not await _ask(session, f"Deploy {cmd.ref} to {', '.join(cmd.envs)}? [y/N] "):
                    return session.fail("not confirmed; nothing was deployed")
            return await _run_deploy(
                session,
                service,
                DeployKind.DEPLOY,
                cmd.envs,
                cmd.ref,
                wait=args.wait,
                allow_downgrade=allow,
                override=override,
            )
        if isinstance(cmd, commands.MigrateCommand):
            await session.allow(Action.MIGRATE, [cmd.env])
            return await _run_deploy(session, service, DeployKind.MIGRATE, [cmd.env], cmd.ref)
        if isinstance(cmd, commands.Rollback):
            await session.allow(Action.ROLLBACK, [cmd.env])
            return await _run_deploy(
                session, service, DeployKind.ROLLBACK, [cmd.env], None, allow_downgrade=cmd.allow_downgrade
            )
        if isinstance(cmd, commands.Status):
            await session.allow(Action.STATUS, [])
            report = await service.status()
            if session.json:
                session.emit(status_json(report))
            else:
                session.say(*render_status(report, colour=colour_enabled(session.out)))
            return EXIT_FAILED if args.exit_code and _has_findings(report) else EXIT_OK
        if isinstance(cmd, commands.Lock):
            await session.allow(Action.LOCK, [cmd.env])
            lock = await service.lock(cmd.env, session.user, cmd.reason)
            session.say(f"{lock.env} locked by {who(lock.user)} since {when(lock.since)}: {lock.reason}")
            return EXIT_OK
        if isinstance(cmd, commands.Unlock):
            held = await service.lock_on(cmd.env)
            await session.allow(Action.UNLOCK, [cmd.env], lock_holder=held.user if held else None)
            released = await service.unlock(cmd.env, session.user)
            if released is None:
                session.say(f"{cmd.env} was not locked")
            else:
                session.say(f"{cmd.env} unlocked (it was locked by {who(released.user)}: {released.reason})")
            return EXIT_OK
    raise UsageError(f"`{args.command}` is not a command this CLI runs")
