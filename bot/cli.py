"""The `funnelcake` terminal CLI: the same operations as Slack, for when Slack is down or for scripts."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import os
import pwd
import re
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from pydantic import ValidationError

from bot import commands
from bot.errors import BotError, ConfigError, LedgerUnavailable
from bot.ledger import Ledger
from bot.ledger.models import DeployRecord, DeployState, when, who
from bot.logs import file_logging, register_settings_secrets
from bot.models import DeployKind, Plan, plural
from bot.pipeline.engine import PipelineResult, Reporter
from bot.policy.authz import Action, Authority, GroupCache, Principal
from bot.settings import FunnelcakeConfig, Settings, load_config
from bot.terminal import TerminalReporter, colour_enabled, paint

if TYPE_CHECKING:
    # Only for annotations: the status report, the deploy service and Slack pull in kubernetes_asyncio,
    # the registry clients and slack_sdk, which `history`, `config-check` and `--help` must not pay for.
    from bot.drift import DriftReport
    from bot.service import DeployService
    from handlers.directory import SlackClient
    from handlers.reporter import SlackThreadReporter

log = logging.getLogger("bot.cli")

PROG = "funnelcake"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_ENDED, EXIT_CANCELLED = 0, 1, 2, 3, 4, 130
FOLLOW_EVERY = 1.0  # seconds between ledger reads while following a deploy another process runs
LOG_FILE = "funnelcake-cli.log"
DISTRIBUTION = "funnelcake-deploy-bot"
# `status --exit-code`: findings of these severities make it exit 1 (drift, an unreachable part, failing
# pods or checks, a locked env, locks unknown); "info" and "ok" do not.
FINDING_SEVERITIES = ("warn", "error")
_SLACK_USER_RE = re.compile(r"^[UW][A-Z0-9]{2,}$")
# A migrate run stops after the migration Job: no overlay bump, sync or rollout.

DESCRIPTION = """\
Deploy funnelcake from a terminal: the same operations as the Slack bot, for when Slack is down or for
scripts. Every command works on the environments of the file named by FUNNELCAKE_CONFIG.
"""
EPILOG = """\
who you are: your OS user, mapped to a Slack user by `operators` in the environments file; the same
rules as in Slack then apply to that user. An OS user no operator maps may only run status, history
and plan. `--as U…` acts as another Slack user, only for an operator with `impersonate: true`. The
audit trail records the Slack user, your OS user and this host.

production: a deploy to an environment that needs approval stops after the plan. With SLACK_BOT_TOKEN
set and a `channel` for the environment, the CLI posts the plan with Approve/Deny buttons there. A
second person (an approver who is not you) approves it in Slack or with `funnelcake approve ID`.
With --wait the CLI follows the deploy to its end; without it, it exits 0 awaiting approval.

exit codes: 0 success (or awaiting approval without --wait), 1 the deploy/plan/operation failed,
2 usage or configuration error (config-check: the file has problems) or the ledger unreachable,
3 not allowed (who may do what: see the README), 4 the deploy ended without running (denied or
expired), 130 interrupted with Ctrl-C (a running deploy is cancelled and its locks released).
`status --exit-code` exits 1 when there are warn or error findings.

--json (status, history, plan, deploy, rollback, migrate, approve, deny): one JSON document on stdout
and nothing else there; progress and messages go to stderr. Its fields are listed in the README.
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
        help="act as this Slack user (U…); only for operators allowed to impersonate",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        parents=[who_opts],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version of funnelcake and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    json_help = "print the result as one JSON document on stdout (fields: see the README)"

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
        "production (any environment that needs approval): the CLI starts the deploy, posts the\n"
        'approval request to the environment\'s Slack channel, prints its id and "awaiting approval";\n'
        "with --wait it follows the deploy until it ends, else it exits 0. A second person approves it\n"
        "in Slack or with `funnelcake approve ID`; nothing is changed until then.",
    )
    deploy.add_argument("envs", metavar="ENV[,ENV…]", help="environment(s), comma-separated")
    deploy.add_argument("commit", metavar="COMMIT", help="commit hash (7-40 hex) or branch/tag name")
    deploy.add_argument("--dry-run", action="store_true", help="only show the plan (same as `plan`)")
    deploy.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    deploy.add_argument("--wait", action="store_true", help="follow a deploy awaiting approval to its end")
    deploy.add_argument("--json", action="store_true", help=json_help)

    for name, verb in (("approve", "approve"), ("deny", "deny")):
        decide = add(name, f"{verb} a deploy waiting for approval (the same rules as the Slack button)")
        decide.add_argument("deploy_id", metavar="DEPLOY_ID", help="the id the deploy's requester was given")
        decide.add_argument("--json", action="store_true", help=json_help)
    downgrade = "confirm moving an environment back to an older commit"
    deploy.add_argument("--allow-downgrade", action="store_true", help=downgrade)
    deploy.add_argument("--override", metavar="REASON", help="go past a promotion gate (admins), saying why")

    plan = add("plan", "show what a deploy would do, touching nothing")
    plan.add_argument("envs", metavar="ENV[,ENV…]")
    plan.add_argument("commit", metavar="COMMIT")
    plan.add_argument("--allow-downgrade", action="store_true", help=downgrade)
    plan.add_argument("--json", action="store_true", help=json_help)

    status = add("status", "compare every environment: git, live, registry, Argo CD, pods, drift")
    status.add_argument("--json", action="store_true", help="print the drift report as JSON")
    status.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 when there are findings of severity warn or error (for scripts and CI)",
    )

    migrate = add(
        "migrate",
        "run a commit's ClickHouse migrations in one environment",
        "Run a commit's ClickHouse migrations in one environment; how to reach ClickHouse comes from\n"
        "the environment's configuration, never from the command line.",
    )
    migrate.add_argument("env", metavar="ENV")
    migrate.add_argument("commit", metavar="COMMIT")
    migrate.add_argument("--json", action="store_true", help=json_help)

    rollback = add("rollback", "deploy the environment's previous commit again")
    rollback.add_argument("env", metavar="ENV")
    rollback.add_argument(
        "--allow-downgrade", action="store_true", help="confirm rolling back across a migration boundary"
    )
    rollback.add_argument("--json", action="store_true", help=json_help)

    history = add("history", "list recent deploys, newest first")
    history.add_argument("env", metavar="ENV", nargs="?")
    history.add_argument("--limit", metavar="N", help=f"how many (1-{commands.MAX_HISTORY_LIMIT})")
    history.add_argument("--json", action="store_true", help=json_help)
    history.add_argument("--before", metavar="ID", help="only deploys older than deploy ID: the next page")

    lock = add("lock", "refuse deploys to an environment until it is unlocked")
    lock.add_argument("env", metavar="ENV")
    lock.add_argument("reason", metavar="REASON", nargs="+", help="shown to whoever tries to deploy")

    unlock = add("unlock", "allow deploys to a locked environment again")
    unlock.add_argument("env", metavar="ENV")

    check = add(
        "config-check",
        "validate an environments file and print a summary",
        "Validate an environments file (FILE, or the one FUNNELCAKE_CONFIG names) and print a summary of\n"
        "its environments; every problem is printed with its path in the file. Exit 0 when it is valid,\n"
        "2 when it is not.",
    )
    check.add_argument(
        "file", metavar="FILE", nargs="?", help="the file to check (default: FUNNELCAKE_CONFIG)"
    )
    completion = add(
        "completion",
        "print a shell completion script (bash, zsh or tcsh)",
        "Print a completion script for the shell, generated from this parser (with shtab). For bash:\n"
        "  source <(funnelcake completion bash)\n"
        "or save it as ~/.local/share/bash-completion/completions/funnelcake. For zsh:\n"
        '  funnelcake completion zsh > "${fpath[1]}/_funnelcake"\n'
        "For tcsh: eval `funnelcake completion tcsh`.",
    )
    completion.add_argument("shell", choices=COMPLETION_SHELLS, metavar="SHELL", help="bash, zsh or tcsh")
    return parser


class _Version(argparse.Action):
    """argparse's `version` action, reading the version only when asked (importlib.metadata is slow to load)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"{PROG} {version()}")
        parser.exit()


def version() -> str:
    import importlib.metadata  # noqa: PLC0415 - only --version reads it

    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed as a package)"


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
        words += ["--before", args.before] if args.before is not None else []
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
        if not _SLACK_USER_RE.match(as_user):
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


_SEVERITY_COLOUR = {"ok": "green", "info": "blue", "warn": "yellow", "error": "red"}


def render_status(report: DriftReport, *, colour: bool = False) -> list[str]:
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
        if env.endpoints:
            lines.append(f"  endpoints: {env.endpoints}")
        if env.behind:
            lines.append(f"  {plural(len(env.behind), 'commit')} behind production")
        if env.eligible is not None:
            lines.append("  eligible: " + (", ".join(env.eligible) or "nothing has passed the gate yet"))
        lines.append("")
    mark = {"ok": "ok", "info": "info", "warn": "WARN", "error": "ERROR"}
    if report.findings:
        lines.append("findings:")
        lines += [
            f"  {paint(f'{mark[f.severity]:<5}', _SEVERITY_COLOUR[f.severity], enabled=colour)} {f.env}: {f.text}"
            for f in report.findings
        ]
    else:
        lines.append("findings: none, every environment matches git")
    return lines


def render_history(records: Sequence[DeployRecord], *, more: str | None = None) -> list[str]:
    """The table; `more` is the command that lists the next, older page, when there is one."""
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
    lines = [
        "  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)
    ]
    if more:
        lines.append(f"older deploys: {PROG} {more}")
    return lines


# ---- JSON documents (the README's "JSON output" lists these fields; keep them stable) -------------------


def _stamp(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat() if t is not None else None


def record_json(r: DeployRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "kind": r.kind.value,
        "envs": list(r.envs),
        "ref": r.ref,
        "sha": r.sha,
        "short": r.short,
        "state": r.state.value,
        "requester": r.requester,
        "approver": r.approver,
        "origin": r.origin,
        "message": r.message,
        "last_step": r.last_step,
        "tags": dict(r.tags),
        "previous_tags": dict(r.previous_tags),
        "created_at": _stamp(r.created_at),
        "finished_at": _stamp(r.finished_at),
    }


def history_json(records: Sequence[DeployRecord], older: str | None = None) -> dict[str, Any]:
    """`older_than`: when older deploys remain, the id to pass as `--before` for the next page."""
    return {"deploys": [record_json(r) for r in records], "older_than": older}


def status_json(report: DriftReport) -> dict[str, Any]:
    doc = report.to_json()
    doc["has_findings"] = _has_findings(report)
    return doc


def _has_findings(report: DriftReport) -> bool:
    return any(f.severity in FINDING_SEVERITIES for f in report.findings)


# ---- shell completion ---------------------------------------------------------------------------------

COMPLETION_SHELLS = ("bash", "zsh", "tcsh")
# shtab.FILE, spelled out so building the parser does not import shtab
_FILE_COMPLETION = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for `shell`, generated by shtab from the parser itself, so it never drifts."""
    import shtab  # noqa: PLC0415 - only this command needs it

    return str(shtab.complete(parser, shell=shell))


# ---- running ------------------------------------------------------------------------------------------


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
    ledger: Ledger | None = None
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
        if self.slack is not None and self.ledger is not None and record.channel:
            thread = self.threads.get(record.id)
            if thread is None:
                from handlers.reporter import SlackThreadReporter  # noqa: PLC0415 - see TYPE_CHECKING

                thread = self.threads[record.id] = SlackThreadReporter(self.slack, self.ledger, record)
            out.append(thread)
        return out

    @contextlib.asynccontextmanager
    async def service(self) -> AsyncIterator[DeployService]:
        # Imported here: building adapters pulls in kubernetes_asyncio and SQLAlchemy, which
        # `config-check` and `--help` should not pay for.
        from bot.wiring import build_service  # noqa: PLC0415
        from handlers.directory import SlackPeople, connect  # noqa: PLC0415 - see TYPE_CHECKING above

        async with contextlib.AsyncExitStack() as stack:
            token = self.settings.slack_bot_token
            if token is not None:
                self.slack = await stack.enter_async_context(
                    connect(token.get_secret_value(), self.settings.slack_api_url)
                )
            service = await stack.enter_async_context(
                build_service(self.settings, self.config, reporters=self.reporters)
            )
            self.ledger = service.deps.ledger
            if self.slack is not None:
                service.deps.people = SlackPeople(self.slack)
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


def _steps(kind: DeployKind, envs: Sequence[str], config: FunnelcakeConfig) -> list[str]:
    from bot.service import EXECUTE_STEPS, MIGRATE_STEPS, PLAN_STEPS  # noqa: PLC0415 - see TYPE_CHECKING

    if kind is not DeployKind.ROLLBACK and any(config.env(e).approval_required for e in envs):
        return [*PLAN_STEPS, "approval"]
    return [*PLAN_STEPS, *(MIGRATE_STEPS if kind is DeployKind.MIGRATE else EXECUTE_STEPS)]


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
        record = await service.deps.ledger.get_deploy(record.id)
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
    raw = reporter.data.get("approval", {}).get("expires_at") if reporter else None
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
    if not re.match(r"^[a-z0-9-]{1,16}$", deploy_id):
        raise UsageError(f"{deploy_id[:40]!r} is not a deploy id: `{PROG} history` lists them")
    record = await service.deps.ledger.get_deploy(deploy_id)
    await session.allow(Action.APPROVE if approve else Action.DENY, record.envs, requester=record.requester)
    authority = session.authority()
    mine = [e.name for e in authority.approval_envs(record.envs) if await authority.approves(e, session.user)]
    from bot.service import EXECUTE_STEPS  # noqa: PLC0415 - see TYPE_CHECKING above

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
    return isinstance(cmd, (commands.Status, commands.History, commands.Plan))


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
        if isinstance(cmd, commands.Plan) or (isinstance(cmd, commands.Deploy) and cmd.dry_run):
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
        if isinstance(cmd, commands.Migrate):
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
            held = next((lk for lk in await service.deps.ledger.locks() if lk.env == cmd.env), None)
            await session.allow(Action.UNLOCK, [cmd.env], lock_holder=held.user if held else None)
            released = await service.unlock(cmd.env, session.user)
            if released is None:
                session.say(f"{cmd.env} was not locked")
            else:
                session.say(f"{cmd.env} unlocked (it was locked by {who(released.user)}: {released.reason})")
            return EXIT_OK
    raise UsageError(f"`{args.command}` is not a command this CLI runs")


def _config_check(config: FunnelcakeConfig, source: str) -> int:
    """The file is valid (a ConfigError listing every problem with its path was raised otherwise)."""
    print(f"{source}: valid, {plural(len(config.environments), 'environment')}")
    for env in config.environments:
        approval = "approval required" if env.approval_required else "no approval"
        print(
            f"{env.name}: {env.registry} · {env.kube_context} · migrations {env.migrations.mode} · {approval}"
        )
    return EXIT_OK


def _setup_logging(settings: Settings) -> tuple[logging.Handler, Path | None]:
    """Logs go to a file, never the terminal: the terminal gets one clear message, the file the traceback.
    The file is redacted like every other log: the settings' secrets never reach it."""
    register_settings_secrets(settings)
    path = settings.work_dir / LOG_FILE
    try:
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        return file_logging(path, settings.log_level), path
    except (OSError, ValueError):
        handler = logging.NullHandler()
        logging.getLogger().addHandler(handler)
        return handler, None


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
    if args.command == "completion":
        print(completion_script(args.shell, build_parser()), end="")
        return EXIT_OK
    if args.command == "config-check" and args.file is not None:
        # the file named on the command line: nothing else (settings, ledger, clusters) is read
        try:
            return _config_check(load_config(Path(args.file)), args.file)
        except ConfigError as e:
            print(f"error: {e.message}", file=sys.stderr)
            return EXIT_USAGE
    handler: logging.Handler | None = None
    log_path: Path | None = None
    session: Session | None = None
    try:
        settings = Settings()
        handler, log_path = _setup_logging(settings)
        config = settings.load()
        if args.command == "config-check":
            return _config_check(config, str(settings.funnelcake_config))
        session = Session(settings, config, json=getattr(args, "json", False))
        cmd = None if args.command in ("approve", "deny") else _validated(args, config)
        session.principal = whoami(args, config)
        if cmd is not None:
            _refuse_unconfirmable(args, cmd)
        return asyncio.run(_dispatch(session, args, cmd))
    except KeyboardInterrupt:
        if session and session.following:
            print(
                f"stopped following deploy {session.deploy_id}; it goes on without this terminal",
                file=sys.stderr,
            )
            return EXIT_CANCELLED
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
    except Refused as e:
        print(f"error: not allowed: {e}", file=sys.stderr)
        print("hint: the README's authorization matrix says who may do what", file=sys.stderr)
        return EXIT_REFUSED
    except (ConfigError, LedgerUnavailable) as e:  # a DATABASE_URL that cannot work, a ledger that is down
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


def run() -> NoReturn:
    """The `funnelcake` command: main(), then exit without tearing the interpreter down.

    Freeing every module of SQLAlchemy, pydantic and kubernetes_asyncio one by one at exit takes longer than
    a `history` itself (about 0.2 s here). Nothing is lost by skipping it: the output is flushed, the log file
    was closed by main(), and the exit hooks (kubernetes_asyncio's temporary CA files) still run.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    atexit._run_exitfuncs()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
