"""The `funnelcake` terminal CLI: the same operations as Slack, for when Slack is down or for scripts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from bot import commands
from bot.drift import DriftReport
from bot.errors import BotError, ConfigError
from bot.ledger.models import DeployKind, DeployRecord, DeployState, when, who
from bot.models import Plan, plural
from bot.pipeline.engine import PipelineResult, Reporter
from bot.service import EXECUTE_STEPS, MIGRATE_STEPS, PLAN_STEPS, DeployService
from bot.settings import FunnelcakeConfig, Settings
from bot.terminal import TerminalReporter

log = logging.getLogger("bot.cli")

PROG = "funnelcake"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
LOG_FILE = "funnelcake-cli.log"
MAX_USER_LENGTH = 100
# A migrate run stops after the migration Job: no overlay bump, sync or rollout.

DESCRIPTION = """\
Deploy funnelcake from a terminal: the same operations as the Slack bot, for when Slack is down or for
scripts. Every command works on the environments of the file named by FUNNELCAKE_CONFIG.
"""
EPILOG = """\
who you are: --as NAME, else $FUNNELCAKE_USER, else your OS user name. It is recorded in the audit trail.

production: a deploy to an environment that needs approval (production) stops after the plan. The CLI
prints the deploy id and "awaiting approval" and exits 0 with the deploy in state awaiting_approval; a
second person (an approver who is not you) approves it in Slack, and the bot runs the rest.

exit codes: 0 success (or awaiting approval), 1 the deploy/plan/operation failed, 2 usage or
configuration error, 130 interrupted with Ctrl-C (a running deploy is cancelled and its locks released).
"""


class UsageError(Exception):
    """The command line could not be used as given; exit 2 with this message."""


# ---- argument parsing ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # `--as` is accepted before or after the subcommand; SUPPRESS keeps a subparser from resetting it.
    who_opts = argparse.ArgumentParser(add_help=False)
    who_opts.add_argument(
        "--as",
        dest="as_user",
        metavar="NAME",
        default=argparse.SUPPRESS,
        help="who is asking (default: $FUNNELCAKE_USER, else the OS user)",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        parents=[who_opts],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=description or help_,
            parents=[who_opts],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    deploy = add(
        "deploy",
        "deploy a commit to one or more environments",
        "Deploy a commit of funnelcake (api, relay, and migrations when they changed) to one or more\n"
        "environments, showing each step live.\n\n"
        "Without --yes the plan is shown first and you are asked to confirm; without a terminal to\n"
        "ask on, --yes is required.\n\n"
        "production (any environment that needs approval): the CLI starts the deploy, prints its id\n"
        'and "awaiting approval", and exits 0 in state awaiting_approval. A second person approves\n'
        "it in Slack; nothing is changed until then.",
    )
    deploy.add_argument("envs", metavar="ENV[,ENV…]", help="environment(s), comma-separated")
    deploy.add_argument("commit", metavar="COMMIT", help="commit hash (7-40 hex) or branch/tag name")
    deploy.add_argument("--dry-run", action="store_true", help="only show the plan (same as `plan`)")
    deploy.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    downgrade = "confirm moving an environment back to an older commit"
    deploy.add_argument("--allow-downgrade", action="store_true", help=downgrade)
    deploy.add_argument("--override", metavar="REASON", help="go past a promotion gate (admins), saying why")

    plan = add("plan", "show what a deploy would do, touching nothing")
    plan.add_argument("envs", metavar="ENV[,ENV…]")
    plan.add_argument("commit", metavar="COMMIT")
    plan.add_argument("--allow-downgrade", action="store_true", help=downgrade)

    status = add("status", "compare every environment: git, live, registry, Argo CD, pods, drift")
    status.add_argument("--json", action="store_true", help="print the drift report as JSON")

    migrate = add(
        "migrate",
        "run a commit's ClickHouse migrations in one environment",
        "Run a commit's ClickHouse migrations in one environment; how to reach ClickHouse comes from\n"
        "the environment's configuration, never from the command line.",
    )
    migrate.add_argument("env", metavar="ENV")
    migrate.add_argument("commit", metavar="COMMIT")

    rollback = add("rollback", "deploy the environment's previous commit again")
    rollback.add_argument("env", metavar="ENV")
    rollback.add_argument(
        "--allow-downgrade", action="store_true", help="confirm rolling back across a migration boundary"
    )

    history = add("history", "list recent deploys, newest first")
    history.add_argument("env", metavar="ENV", nargs="?")
    history.add_argument("--limit", metavar="N", help=f"how many (1-{commands.MAX_HISTORY_LIMIT})")

    lock = add("lock", "refuse deploys to an environment until it is unlocked")
    lock.add_argument("env", metavar="ENV")
    lock.add_argument("reason", metavar="REASON", nargs="+", help="shown to whoever tries to deploy")

    unlock = add("unlock", "allow deploys to a locked environment again")
    unlock.add_argument("env", metavar="ENV")

    add("config-check", "validate the environments file and print a summary")
    return parser


def _validated(args: argparse.Namespace, config: FunnelcakeConfig) -> commands.Command:
    """Run the words through the Slack grammar, so env and commit rules and messages are the same."""
    words: list[str] = [args.command]
    name = args.command
    if name in ("deploy", "plan"):
        words += [args.envs, args.commit]
        words += ["--dry-run"] if getattr(args, "dry_run", False) else []
        words += ["--allow-downgrade"] if getattr(args, "allow_downgrade", False) else []
        # last: the grammar reads the rest of the line as the reason
        words += ["--override", *args.override.split()] if getattr(args, "override", None) else []
    elif name == "migrate":
        words += [args.env, args.commit]
    elif name in ("rollback", "unlock"):
        words += [args.env]
        words += ["--allow-downgrade"] if getattr(args, "allow_downgrade", False) else []
    elif name == "history":
        words += [args.env] if args.env else []
        words += ["--limit", args.limit] if args.limit is not None else []
    elif name == "lock":
        words += [args.env, *args.reason]
    # The grammar reads space-separated words: a quoted argument with a space would be read as two.
    spaced = [w for w in words[1:] if not w or any(c.isspace() for c in w)]
    if getattr(args, "override", None) is not None and not args.override.split():
        raise UsageError("--override needs the reason for going past the promotion gate.")
    if spaced and name != "lock":
        raise UsageError(f"{spaced[0]!r} is not a single word; environments and commits have no spaces.")
    if name == "migrate" and args.commit.casefold() == "force":
        raise UsageError(
            "`migrate ENV force VERSION` (the dirty-database recovery) is only offered in Slack, "
            "where it is guarded by the failed run's thread."
        )
    parsed = commands.parse(" ".join(words), config.env_names, prog=PROG)
    if isinstance(parsed, commands.Usage):
        raise UsageError(parsed.message)
    return parsed


def requester(args: argparse.Namespace) -> str:
    name = getattr(args, "as_user", None) or os.environ.get("FUNNELCAKE_USER")
    if not name:
        try:
            name = getpass.getuser()
        except (OSError, KeyError):
            name = None
    if not name:
        raise UsageError("Cannot tell who you are: pass --as NAME or set FUNNELCAKE_USER.")
    if len(name) > MAX_USER_LENGTH or not name.isprintable() or any(c.isspace() for c in name):
        raise UsageError(
            f"{name[:40]!r} is not a usable name: one word of at most {MAX_USER_LENGTH} characters."
        )
    return name


# ---- rendering ----------------------------------------------------------------------------------------


def _digest(d: str | None) -> str:
    return d.split(":", 1)[-1][:12] if d else ""


def render_plan(plan: Plan) -> list[str]:
    c = plan.commit
    subject = f' "{c.subject}"' if c.subject else ""
    author = f" by {c.author}" if c.author else ""
    lines = [f"Plan: {plan.kind.value} {c.short}{subject}{author} → {', '.join(plan.envs)}"]
    if plan.commits:
        n = len(plan.commits)
        lines.append(f"  {plural(n, 'commit')} since the deployed tag:")
        lines += [
            f"    {ci.short} {ci.subject}" + (f" ({ci.author})" if ci.author else "")
            for ci in plan.commits[:10]
        ]
        if n > 10:
            lines.append(f"    … and {n - 10} more")
    for name, ep in plan.env_plans.items():
        lines.append(f"  {name}:" + ("" if ep.moves else " no tag deployed yet"))
        for move in ep.moves:
            lines.append(f"    {move.describe(c.short)}")
            lines += [f"      - {ci.short} {ci.subject}" for ci in move.behind[:10]]
        width = max((len(f"{i.image}:{i.tag}") for i in ep.images), default=0)
        for img in ep.images:
            action = {"present": "present", "promote": f"promote from {img.source_env}", "build": "build"}[
                img.action
            ]
            detail = " ".join(x for x in (_digest(img.digest), img.note) if x)
            lines.append(f"    {img.image + ':' + img.tag:<{width}}  {action}  {detail}".rstrip())
        lines.append(f"    migrations: {'run' if ep.run_migrations else 'none to run'}")
        if ep.locked_by:
            lines.append(f"    locked: {ep.locked_by}")
    if plan.migrations:
        lines.append("  migrations changed: " + ", ".join(plan.migrations))
    for warning in plan.warnings:
        lines.append(f"  WARNING: {warning}")
    for gate in plan.overridden:
        lines.append(f"  OVERRIDDEN ({plan.override_reason}): {gate}")
    for problem in plan.problems:
        lines.append(f"  problem: {problem}")
    return lines


def render_status(report: DriftReport) -> list[str]:
    lines: list[str] = []
    header = ("service", "overlay", "live", "registry", "argo cd", "pods")
    for env in report.envs:
        lines.append(env.env + (f"  [{env.lock}]" if env.lock else ""))
        lines += [f"  {part}: {why}" for part, why in env.unavailable()]
        rows = [
            (
                r.service,
                r.overlay_tag or "?",
                r.live_tag or "?",
                r.registry,
                f"{r.argo_sync}/{r.argo_health}",
                f"{r.ready}/{r.total}",
            )
            for r in env.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        for row in (header, *rows):
            lines.append("  " + "  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip())
        if env.site:
            lines.append(f"  site: {env.site}")
        if env.behind:
            lines.append(f"  {plural(len(env.behind), 'commit')} behind production")
        if env.eligible is not None:
            lines.append("  eligible: " + (", ".join(env.eligible) or "nothing has passed the gate yet"))
        lines.append("")
    mark = {"ok": "ok", "info": "info", "warn": "WARN", "error": "ERROR"}
    if report.findings:
        lines.append("findings:")
        lines += [f"  {mark[f.severity]:<5} {f.env}: {f.text}" for f in report.findings]
    else:
        lines.append("findings: none, every environment matches git")
    return lines


def render_history(records: Sequence[DeployRecord]) -> list[str]:
    if not records:
        return ["no deploys recorded"]
    header = ("id", "when", "kind", "envs", "commit", "state", "by", "message")
    rows = [
        (
            r.id,
            r.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
            r.kind.value,
            ",".join(r.envs),
            r.short or r.ref,
            r.state.value,
            r.requester,
            (r.message or "").replace("\n", " "),
        )
        for r in records
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)
    ]


# ---- running ------------------------------------------------------------------------------------------


@dataclass
class Session:
    """One invocation: the streams, who is asking, and the deploy started (so Ctrl-C can name it)."""

    settings: Settings
    config: FunnelcakeConfig
    user: str
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    reporter: TerminalReporter | None = None
    deploy_id: str | None = None
    stopped: str | None = None  # how Ctrl-C ended the deploy, in the same words as the Slack thread

    def say(self, *lines: str) -> None:
        for line in lines:
            print(line, file=self.out)
        self.out.flush()

    def fail(self, message: str, hint: str | None = None) -> int:
        print(f"error: {message}", file=self.err)
        if hint:
            print(f"hint: {hint}", file=self.err)
        self.err.flush()
        return EXIT_FAILED

    def reporters(self, record: DeployRecord) -> Sequence[Reporter]:
        return [self.reporter] if self.reporter is not None else []

    @contextlib.asynccontextmanager
    async def service(self) -> AsyncIterator[DeployService]:
        # Imported here: building adapters pulls in kubernetes_asyncio and SQLAlchemy, which
        # `config-check` and `--help` should not pay for.
        from bot.wiring import build_service  # noqa: PLC0415

        async with build_service(self.settings, self.config, reporters=self.reporters) as service:
            yield service


def _steps(kind: DeployKind, envs: Sequence[str], config: FunnelcakeConfig) -> list[str]:
    if kind is not DeployKind.ROLLBACK and any(config.env(e).approval_required for e in envs):
        return [*PLAN_STEPS, "approval"]
    return [*PLAN_STEPS, *(MIGRATE_STEPS if kind is DeployKind.MIGRATE else EXECUTE_STEPS)]


async def _ask(session: Session, question: str) -> bool:
    """A yes/no answer from the terminal, read through the loop so Ctrl-C still cancels cleanly."""
    session.out.write(question)
    session.out.flush()
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
) -> int:
    plan, result = await service.plan(
        envs, ref, session.user, allow_downgrade=allow_downgrade, override_reason=override
    )
    if plan is not None:
        session.say(*render_plan(plan))
    return _plan_verdict(session, result)


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
    allow_downgrade: bool = False,
    override: str | None = None,
) -> int:
    target = ", ".join(envs)
    reporter = TerminalReporter(
        _steps(kind, envs, session.config), title=f"{kind.value} {ref or ''} → {target}", stream=session.out
    )
    session.reporter = reporter
    async with reporter:
        if ref is None:
            started = await service.start_rollback(envs[0], session.user, allow_downgrade=allow_downgrade)
        else:
            started = await service.start(
                kind, envs, ref, session.user, allow_downgrade=allow_downgrade, override_reason=override
            )
        reporter.title = f"{kind.value} {started.record.ref} → {target} ({started.record.id})"
        session.deploy_id = started.record.id
        try:
            # Not service.wait(): it swallows the waiter's own cancellation, and Ctrl-C must get through.
            await asyncio.wait({started.task})
        except asyncio.CancelledError:
            # Ctrl-C: a cancel by this user, through the same path (and words) as the Slack Cancel button.
            with contextlib.suppress(BotError):
                ended = await asyncio.shield(service.cancel(started.record.id, session.user))
                session.stopped = ended.message
            raise
        record = await service.wait(started.record.id)
    return _outcome(session, record)


def _approval_expiry(reporter: TerminalReporter | None) -> datetime | None:
    raw = reporter.data.get("approval", {}).get("expires_at") if reporter else None
    try:
        return datetime.fromisoformat(raw) if isinstance(raw, str) else None
    except ValueError:
        return None


def _outcome(session: Session, record: DeployRecord) -> int:
    what = f"{record.kind.value} {record.id} ({record.short or record.ref} → {', '.join(record.envs)})"
    took = ""
    if record.finished_at is not None:
        took = f" in {(record.finished_at - record.created_at).total_seconds():.1f}s"
    if record.state is DeployState.SUCCEEDED:
        session.say(f"{what} succeeded{took}")
        return EXIT_OK
    if record.state is DeployState.AWAITING_APPROVAL:
        expires = _approval_expiry(session.reporter)
        session.say(
            f"{what}: awaiting approval.",
            "A second person must approve it in Slack; nothing is changed until then"
            + (f" (the request expires at {when(expires)})." if expires else "."),
        )
        return EXIT_OK
    failure = session.reporter.failure if session.reporter else None
    hint = failure.hint if failure else None
    if hint is None:
        scope = f" {record.envs[0]}" if len(record.envs) == 1 else ""
        hint = f"The steps above show where it stopped; `{PROG} history{scope}` lists the deploys."
    return session.fail(f"{what} {record.state.value}: {record.message or 'no message recorded'}", hint)


async def _dispatch(session: Session, args: argparse.Namespace, cmd: commands.Command) -> int:
    async with session.service() as service:
        if isinstance(cmd, commands.Plan) or (isinstance(cmd, commands.Deploy) and cmd.dry_run):
            return await _show_plan(
                session,
                service,
                cmd.envs,
                cmd.ref,
                allow_downgrade=cmd.allow_downgrade,
                override=cmd.override,
            )
        if isinstance(cmd, commands.Deploy):
            allow, override = cmd.allow_downgrade, cmd.override
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
                allow_downgrade=allow,
                override=override,
            )
        if isinstance(cmd, commands.Migrate):
            return await _run_deploy(session, service, DeployKind.MIGRATE, [cmd.env], cmd.ref)
        if isinstance(cmd, commands.Rollback):
            return await _run_deploy(
                session, service, DeployKind.ROLLBACK, [cmd.env], None, allow_downgrade=cmd.allow_downgrade
            )
        if isinstance(cmd, commands.Status):
            report = await service.status()
            if args.json:
                session.say(json.dumps(report.to_json(), indent=2, default=str))
            else:
                session.say(*render_status(report))
            return EXIT_OK
        if isinstance(cmd, commands.History):
            session.say(*render_history(await service.history(cmd.env, cmd.limit)))
            return EXIT_OK
        if isinstance(cmd, commands.Lock):
            lock = await service.lock(cmd.env, session.user, cmd.reason)
            session.say(f"{lock.env} locked by {who(lock.user)} since {when(lock.since)}: {lock.reason}")
            return EXIT_OK
        if isinstance(cmd, commands.Unlock):
            released = await service.unlock(cmd.env, session.user)
            if released is None:
                session.say(f"{cmd.env} was not locked")
            else:
                session.say(f"{cmd.env} unlocked (it was locked by {who(released.user)}: {released.reason})")
            return EXIT_OK
    raise UsageError(f"`{args.command}` is not a command this CLI runs")


def _config_check(session: Session) -> int:
    for env in session.config.environments:
        approval = "approval required" if env.approval_required else "no approval"
        session.say(
            f"{env.name}: {env.registry} · {env.kube_context} · migrations {env.migrations.mode} · {approval}"
        )
    return EXIT_OK


def _setup_logging(settings: Settings) -> tuple[logging.Handler, Path | None]:
    """Logs go to a file, never the terminal: the terminal gets one clear message, the file the traceback."""
    root = logging.getLogger()
    path: Path | None = settings.work_dir / LOG_FILE
    try:
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(settings.work_dir / LOG_FILE, encoding="utf-8")
    except OSError:
        handler, path = logging.NullHandler(), None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    handler.setLevel(level)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
    logging.captureWarnings(True)
    return handler, path


def _refuse_unconfirmable(args: argparse.Namespace, cmd: commands.Command) -> None:
    if isinstance(cmd, commands.Deploy) and not (cmd.dry_run or args.yes) and not sys.stdin.isatty():
        raise UsageError(
            "deploy asks for confirmation, and there is no terminal to ask on: pass --yes "
            "(or run `plan` first to see what it would do)."
        )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error argparse already printed (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler: logging.Handler | None = None
    log_path: Path | None = None
    session: Session | None = None
    try:
        settings = Settings()
        handler, log_path = _setup_logging(settings)
        config = settings.load()
        session = Session(settings, config, "")
        if args.command == "config-check":
            return _config_check(session)
        cmd = _validated(args, config)
        session.user = requester(args)
        _refuse_unconfirmable(args, cmd)
        return asyncio.run(_dispatch(session, args, cmd))
    except KeyboardInterrupt:
        stopped = (
            f": deploy {session.deploy_id} — {session.stopped or 'stopped'}; its locks are released"
            if session and session.deploy_id
            else ""
        )
        print(f"cancelled{stopped}", file=sys.stderr)
        return EXIT_CANCELLED
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as e:
        print(f"error: invalid environment variables:\n{_short_validation(e)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`funnelcake status --json | head`): not an error worth a message.
        _silence_stdout()
        return EXIT_FAILED
    except BotError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        log.exception("internal error in `%s %s`", PROG, args.command)
        where = f"see {log_path}" if log_path else "see logs"
        # Only the type: an unexpected exception's text may quote a URL or header with a secret in it.
        print(f"error: internal error: {type(e).__name__} ({where})", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _silence_stdout() -> None:
    # Python flushes stdout again at exit and would report the broken pipe a second time.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _short_validation(e: ValidationError) -> str:
    # Never echo the input: a malformed secret would land in the terminal.
    return "\n".join(
        f"  - {'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
        for err in e.errors(include_url=False)
    )


if __name__ == "__main__":
    sys.exit(main())
