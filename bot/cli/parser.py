"""The CLI's surface: its exit codes, the argument parser (built from the command table in bot.commands),
--version, the typed command the arguments make and the shell completion scripts generated from the
parser. Part of bot/cli."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from bot import commands
from bot.settings import FunnelcakeConfig, Settings

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


# What the CLI says about a command beyond the grammar's summary: what only the terminal has.
_CLI_NOTES = {
    "deploy": "The CLI shows each step live. Without --yes the plan is shown first and you are asked to\n"
    "confirm; without a terminal to ask on, --yes is required.\n\n"
    "production (any environment that needs approval): the CLI starts the deploy, posts the\n"
    'approval request to the environment\'s Slack channel, prints its id and "awaiting approval";\n'
    "with --wait it follows the deploy until it ends, else it exits 0. A second person approves it\n"
    "in Slack or with `funnelcake approve ID`; nothing is changed until then.",
    "migrate": "`migrate ENV force VERSION` (the dirty-database recovery) is only offered in Slack.",
}
# `--json` on these commands; `status` says what its document is.
_JSON_COMMANDS = ("deploy", "plan", "migrate", "rollback", "history")
_JSON_HELP = "print the result as one JSON document on stdout (fields: see the README)"


def _no_envs() -> Sequence[str]:
    return ()


def build_parser(env_names: Callable[[], Sequence[str]] = _no_envs) -> argparse.ArgumentParser:
    """The CLI's parser, built from the command table in bot.commands: each field's validator is its
    argument's `type`, so parsing gives the values of the typed command Slack would get. `env_names` gives
    the configured environments when an argument names one (read then, so --help needs no config)."""
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

    def add(name: str, help_: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=description or help_,
            parents=[who_opts],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    for name, spec in commands.SPECS.items():
        if spec.make is None:  # `help`: the CLI has --help
            continue
        note = _CLI_NOTES.get(name)
        cmd = add(name, spec.brief, textwrap.fill(spec.summary, 100) + (f"\n\n{note}" if note else ""))
        for field in spec.fields:
            _add_field(cmd, name, field, env_names)
        _add_cli_options(cmd, name)
        if name == "deploy":  # approve and deny follow deploy in the list of commands
            for decision in ("approve", "deny"):
                decide = add(
                    decision, f"{decision} a deploy waiting for approval (the same rules as the Slack button)"
                )
                decide.add_argument(
                    "deploy_id", metavar="DEPLOY_ID", help="the id the deploy's requester was given"
                )
                decide.add_argument("--json", action="store_true", help=_JSON_HELP)

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


def _add_cli_options(cmd: argparse.ArgumentParser, name: str) -> None:
    """The options only the terminal has (Slack has neither --json nor a confirmation to skip)."""
    if name in _JSON_COMMANDS:
        cmd.add_argument("--json", action="store_true", help=_JSON_HELP)
    if name == "deploy":
        cmd.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
        cmd.add_argument("--wait", action="store_true", help="follow a deploy awaiting approval to its end")
    if name == "status":
        cmd.add_argument("--json", action="store_true", help="print the drift report as JSON")
        cmd.add_argument(
            "--exit-code",
            action="store_true",
            help="exit 1 when there are findings of severity warn or error (for scripts and CI)",
        )


def _add_field(
    cmd: argparse.ArgumentParser, name: str, field: commands.Field, env_names: Callable[[], Sequence[str]]
) -> None:
    if field.option is None and field.rest:
        # free text is read whole once parsed (command_of): its validator sees the line, not each word
        cmd.add_argument(field.dest, metavar=field.metavar, nargs="+", help=field.help)
    elif field.option is None:
        nargs = "?" if field.optional else None
        convert = _typed(name, field, env_names)
        cmd.add_argument(field.dest, metavar=field.metavar, nargs=nargs, type=convert, help=field.help)
    elif field.read is None:
        cmd.add_argument(field.option, dest=field.dest, action="store_true", help=field.help)
    else:
        cmd.add_argument(
            field.option,
            dest=field.dest,
            metavar=field.metavar,
            type=_typed(name, field, env_names),
            default=field.default,
            help=field.help,
        )


def _typed(
    name: str, field: commands.Field, env_names: Callable[[], Sequence[str]]
) -> Callable[[str], object]:
    """The field's validator as an argparse `type`: its problem is a UsageError (exit 2, `error: …` and how
    to write the command, as Slack says it), which argparse lets through rather than rewording it."""

    read = field.read
    if read is None:
        raise TypeError(f"{field.dest} is a flag: it has no value to read")

    def convert(text: str) -> object:
        envs = env_names()
        try:
            return read(text, commands.FieldContext(name, envs))
        except commands.FieldError as e:
            raise UsageError(commands.usage(str(e), name, envs, PROG).message) from None

    convert.__name__ = field.dest  # what argparse would name in its own messages
    return convert


class ConfigUnreadable(Exception):
    """The environments file (or the settings naming it) could not be read while an argument was parsed.

    Carries the error out of argparse, which would reword a ValueError (pydantic's included) as its own."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class LazyConfig:
    """The settings and environments file, read the first time something needs them."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._config: FunnelcakeConfig | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings()
        return self._settings

    def load(self) -> FunnelcakeConfig:
        if self._config is None:
            self._config = self.settings().load()
        return self._config

    def env_names(self) -> Sequence[str]:
        try:
            return self.load().env_names
        except Exception as e:
            raise ConfigUnreadable(e) from e


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


def command_of(args: argparse.Namespace, env_names: Sequence[str]) -> commands.Command:
    """The typed command the parsed arguments are: the same one Slack's parser gives for those words."""
    spec = commands.SPECS[args.command]
    values = {f.dest: getattr(args, f.dest) for f in spec.fields}
    for field in spec.fields:
        if field.rest:
            values[field.dest] = _typed(args.command, field, lambda: env_names)(" ".join(values[field.dest]))
    cmd = commands.build(args.command, values)
    if isinstance(cmd, commands.MigrateCommand) and cmd.ref and cmd.ref.casefold() == "force":
        raise UsageError(
            "`migrate ENV force VERSION` (the dirty-database recovery) is only offered in Slack, "
            "where it is guarded by the failed run's thread."
        )
    return cmd


# ---- shell completion ---------------------------------------------------------------------------------

COMPLETION_SHELLS = ("bash", "zsh", "tcsh")
# shtab.FILE, spelled out so building the parser does not import shtab
_FILE_COMPLETION = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for `shell`, generated by shtab from the parser itself, so it never drifts."""
    import shtab  # noqa: PLC0415 - only this command needs it

    return str(shtab.complete(parser, shell=shell))


# ---- running ------------------------------------------------------------------------------------------
