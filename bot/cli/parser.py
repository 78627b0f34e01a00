"""The CLI's surface: its exit codes, the argument parser, --version, the validated command and the shell
completion scripts generated from the parser. Part of bot/cli (issue 18)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from bot import commands
from bot.settings import FunnelcakeConfig

PROG = "funnelcake"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_ENDED, EXIT_CANCELLED = 0, 1, 2, 3, 4, 130
FOLLOW_EVERY = 1.0  # seconds between ledger reads while following a deploy another process runs
LOG_FILE = "funnelcake-cli.log"
DISTRIBUTION = "funnelcake-deploy-bot"
# `status --exit-code`: findings of these severities make it exit 1 (drift, an unreachable part, failing
# pods or checks, a locked env, locks unknown); "info" and "ok" do not.
FINDING_SEVERITIES = ("warn", "error")
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


# ---- shell completion ---------------------------------------------------------------------------------

COMPLETION_SHELLS = ("bash", "zsh", "tcsh")
# shtab.FILE, spelled out so building the parser does not import shtab
_FILE_COMPLETION = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for `shell`, generated by shtab from the parser itself, so it never drifts."""
    import shtab  # noqa: PLC0415 - only this command needs it

    return str(shtab.complete(parser, shell=shell))


# ---- running ------------------------------------------------------------------------------------------
