"""The `/funnelcake` command grammar: the commands a person can type, their fields and the help text.

One table (SPECS) says, per command, its syntax, help, the fields it takes with the one validator of each,
and the typed command they make. Slack's text parser (bot.commands) and the CLI's argparse (bot.cli.parser,
each validator its argument's `type`) both read through it, so a mistake gets the same message in both.
Pure code, no I/O. bot.commands re-exports every public name here.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from bot.commands.refs import REF_FORMS, is_hex, is_valid_ref, ref_problem
from bot.mrkdwn import escape

# Deploys and history lists are posted to Slack; a bound keeps a reply within one message.
DEFAULT_HISTORY_LIMIT = 10
MAX_HISTORY_LIMIT = 100
MAX_REASON_LENGTH = 300
# golang-migrate versions are unsigned 64-bit integers (often timestamps such as 20240101120000).
MAX_MIGRATION_VERSION = 2**64 - 1
# What a deploy id can be (the ledger's ids are `d-` and six letters or digits; older ones may differ).
DEPLOY_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")


@dataclass(frozen=True)
class Deploy:
    envs: tuple[str, ...]
    ref: str
    dry_run: bool = False
    allow_downgrade: bool = False  # the requester confirms moving an env back
    override: str | None = None  # an admin's reason for going past a promotion gate (plain text)


@dataclass(frozen=True)
class PlanCommand:
    envs: tuple[str, ...]
    ref: str
    allow_downgrade: bool = False
    override: str | None = None


@dataclass(frozen=True)
class Status:
    pass


@dataclass(frozen=True)
class MigrateCommand:
    env: str
    ref: str | None = None
    force_version: int | None = None


@dataclass(frozen=True)
class Rollback:
    env: str
    allow_downgrade: bool = False  # confirms rolling back across a migration boundary


@dataclass(frozen=True)
class History:
    env: str | None = None
    limit: int = DEFAULT_HISTORY_LIMIT
    before: str | None = None  # a deploy id: the page of older deploys than that one


def next_history(cmd: History, last_id: str) -> str:
    """The `history …` words that list the page after the one `cmd` asked for, which ended with `last_id`."""
    words = ["history", *([cmd.env] if cmd.env else [])]
    if cmd.limit != DEFAULT_HISTORY_LIMIT:
        words += ["--limit", str(cmd.limit)]
    return " ".join([*words, "--before", last_id])


@dataclass(frozen=True)
class Lock:
    """`reason` is plain text as typed (`<`, `>`, `&` unescaped): escape it before putting it in mrkdwn."""

    env: str
    reason: str


@dataclass(frozen=True)
class Unlock:
    env: str


@dataclass(frozen=True)
class Help:
    topic: str | None = None


Command = Deploy | PlanCommand | Status | MigrateCommand | Rollback | History | Lock | Unlock | Help


@dataclass(frozen=True)
class Usage:
    """The text could not be read as a command; `message` says why and how to write it."""

    message: str
    topic: str | None = None

    def __str__(self) -> str:
        return self.message


# ---- fields: what each command takes, and the one validator of each ----------------------------------


class FieldError(Exception):
    """The text given for a field cannot be its value; the message says why, for the person who typed it.

    Not a ValueError: the CLI's argparse would turn that into its own `invalid value` message."""


@dataclass(frozen=True)
class FieldContext:
    """What a validator may need besides the text: the command it is read for and the configured envs."""

    command: str
    env_names: Sequence[str]


T = TypeVar("T")
Read = Callable[[str, FieldContext], T]


def show(token: str, limit: int = 40) -> str:
    """Echo user input safely: short, printable, and unable to form a Slack mention or break code."""
    shown = "".join(c if c.isprintable() else "?" for c in token)
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    shown = escape(shown).replace("`", "'")
    return f"`{shown}`"


def _env(token: str, env_names: Sequence[str]) -> str:
    if not env_names:
        raise FieldError("No environments are configured.")
    by_fold = {e.casefold(): e for e in env_names}
    env = by_fold.get(token.casefold())
    if env is not None:
        return env
    valid = ", ".join(f"`{e}`" for e in env_names)
    problem = f"Unknown environment {show(token)}."
    close = difflib.get_close_matches(token.casefold(), list(by_fold), n=1, cutoff=0.5)
    prefixed = [e for f, e in by_fold.items() if token and f.startswith(token.casefold())]
    if close:
        problem += f" Did you mean `{by_fold[close[0]]}`?"
    elif len(prefixed) == 1:
        problem += f" Did you mean `{prefixed[0]}`?"
    if is_valid_ref(token) and is_hex(token):
        problem += " (The environment comes first, then the commit.)"
    raise FieldError(f"{problem} Environments: {valid}.")


def read_env(text: str, ctx: FieldContext) -> str:
    """One configured environment, in any case."""
    if "," in text:
        raise FieldError(f"`{ctx.command}` takes one environment at a time.")
    return _env(text, ctx.env_names)


def read_envs(text: str, ctx: FieldContext) -> tuple[str, ...]:
    """`a,b`: configured environments, each named once."""
    envs: list[str] = []
    for part in text.split(","):
        if not part.strip():
            raise FieldError(f"The environment list {show(text)} has an empty entry.")
        env = _env(part.strip(), ctx.env_names)
        if env in envs:
            raise FieldError(f"`{env}` is listed twice; name each environment once.")
        envs.append(env)
    return tuple(envs)


def read_ref(text: str, ctx: FieldContext) -> str:
    problem = ref_problem(text)
    if problem is not None:
        raise FieldError(f"{show(text)} is not a commit: {problem}. Use {REF_FORMS}.")
    return text


def read_limit(text: str, ctx: FieldContext) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= MAX_HISTORY_LIMIT:
        raise FieldError(f"`--limit` takes a whole number from 1 to {MAX_HISTORY_LIMIT}, not {show(text)}.")
    return int(text)


def read_before(text: str, ctx: FieldContext) -> str:
    if not DEPLOY_ID_RE.match(text):
        raise FieldError(
            f"`--before` takes a deploy id such as `d-4k7q2m` (the last one a page listed), not {show(text)}."
        )
    return text


def _reason(text: str, missing: str) -> str:
    # Control characters (a stray backspace, a bidi override) become spaces, and spaces collapse.
    reason = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if not reason:
        raise FieldError(missing)
    if len(reason) > MAX_REASON_LENGTH:
        raise FieldError(f"The reason is {len(reason)} characters long; keep it under {MAX_REASON_LENGTH}.")
    return reason


def read_lock_reason(text: str, ctx: FieldContext) -> str:
    return _reason(text, "Say why the environment is locked; the reason is shown to whoever tries to deploy.")


def read_override(text: str, ctx: FieldContext) -> str:
    return _reason(text, "`--override` needs the reason, e.g. `--override staging is down, hotfix`.")


@dataclass(frozen=True)
class Field:
    """One thing a command takes. `dest` names it in the typed command; `read` turns the text into the
    value or raises FieldError saying what is wrong. Without `read` it is a flag (`--dry-run`)."""

    dest: str
    help: str
    metavar: str | None = None
    option: str | None = None  # `--limit`: an option; None: a positional
    read: Read[object] | None = None
    optional: bool = False  # a positional that may be left out
    rest: bool = False  # free text: every remaining word (a lock's reason)
    default: object = None


_ENVS = Field("envs", "environment(s), comma-separated", "ENV[,ENV…]", read=read_envs)
_ENV = Field("env", "the environment", "ENV", read=read_env)
_REF = Field("ref", "commit hash (7-40 hex) or branch/tag name", "COMMIT", read=read_ref)
_DOWNGRADE = Field(
    "allow_downgrade", "confirm moving an environment back to an older commit", option="--allow-downgrade"
)
_OVERRIDE = Field(
    "override", "go past a promotion gate (admins), saying why", "REASON", "--override", read_override
)


@dataclass(frozen=True)
class Spec:
    syntax: str
    summary: str
    examples: tuple[str, ...]
    brief: str = ""  # one line, for the CLI's list of commands
    fields: tuple[Field, ...] = ()
    make: Callable[..., Command] | None = None  # the typed command, from each field's value by `dest`


_SPECS: dict[str, Spec] = {
    "deploy": Spec(
        "deploy <env>[,<env>…] <commit> [--dry-run] [--allow-downgrade] [--override <reason…>]",
        "Deploy a commit of funnelcake (api, relay, and migrations when they changed) to one or more "
        "environments. Production runs only after a second person approves. With --dry-run, only "
        "shows the plan. Moving an environment back to an older commit needs --allow-downgrade. An "
        "admin can go past a promotion gate (e.g. production takes what succeeded in staging) with "
        "--override and the reason (in Slack, the rest of the line is the reason).",
        ("deploy {env} e7e79eb", "deploy {envs} e7e79eb --dry-run"),
        "deploy a commit to one or more environments",
        (
            _ENVS,
            _REF,
            Field("dry_run", "only show the plan (same as `plan`)", option="--dry-run"),
            _DOWNGRADE,
            _OVERRIDE,
        ),
        Deploy,
    ),
    "plan": Spec(
        "plan <env>[,<env>…] <commit> [--allow-downgrade]",
        "Show what a deploy would do (images to promote or build, migrations, overlay changes) "
        "without touching anything; the same as deploy --dry-run.",
        ("plan {env} e7e79eb",),
        "show what a deploy would do, touching nothing",
        (_ENVS, _REF, _DOWNGRADE, _OVERRIDE),
        PlanCommand,
    ),
    "status": Spec(
        "status",
        "Compare every environment: tag in the GitOps overlay, live image, image in the registry, "
        "Argo CD sync and health, pods, and how far each environment is behind production.",
        ("status",),
        "compare every environment: git, live, registry, Argo CD, pods, drift",
        (),
        Status,
    ),
    "migrate": Spec(
        "migrate <env> <commit>  |  migrate <env> force <version>",
        "Run a commit's ClickHouse migrations in an environment (how to reach ClickHouse comes from "
        "the environment's configuration). After a failed run leaves `Dirty database version X`, "
        "`force X` marks version X as clean; then run migrate again.",
        ("migrate {env} e7e79eb", "migrate {env} force 3"),
        "run a commit's ClickHouse migrations in one environment",
        (_ENV, _REF),  # `force <version>` is only read from Slack, guarded by the failed run's thread
        MigrateCommand,
    ),
    "rollback": Spec(
        "rollback <env> [--allow-downgrade]",
        "Deploy the previously deployed commit of an environment again. Back across a migration "
        "(which stays applied) it needs --allow-downgrade.",
        ("rollback {env}",),
        "deploy the environment's previous commit again",
        (
            _ENV,
            Field(
                "allow_downgrade",
                "confirm rolling back across a migration boundary",
                option="--allow-downgrade",
            ),
        ),
        Rollback,
    ),
    "history": Spec(
        "history [env] [--limit N] [--before ID]",
        f"List recent deploys, newest first ({DEFAULT_HISTORY_LIMIT} by default, at most {MAX_HISTORY_LIMIT}); "
        "`--before ID` lists the ones older than deploy ID (a full page ends by saying what to type).",
        ("history", "history {env} --limit 5"),
        "list recent deploys, newest first",
        (
            Field("env", "only this environment's deploys", "ENV", read=read_env, optional=True),
            Field(
                "limit",
                f"how many (1-{MAX_HISTORY_LIMIT})",
                "N",
                "--limit",
                read_limit,
                default=DEFAULT_HISTORY_LIMIT,
            ),
            Field(
                "before", "only deploys older than deploy ID: the next page", "ID", "--before", read_before
            ),
        ),
        History,
    ),
    "lock": Spec(
        "lock <env> <reason…>",
        "Refuse deploys to an environment until it is unlocked; the reason is shown to whoever tries.",
        ("lock {env} load test until 15:00",),
        "refuse deploys to an environment until it is unlocked",
        (
            _ENV,
            Field("reason", "shown to whoever tries to deploy", "REASON", read=read_lock_reason, rest=True),
        ),
        Lock,
    ),
    "unlock": Spec(
        "unlock <env>",
        "Allow deploys to a locked environment again.",
        ("unlock {env}",),
        "allow deploys to a locked environment again",
        (_ENV,),
        Unlock,
    ),
    "help": Spec(
        "help [command]",
        "Explain every command, or one command in detail.",
        ("help", "help deploy"),
    ),
}
COMMAND_NAMES: tuple[str, ...] = tuple(_SPECS)
SPECS: dict[str, Spec] = _SPECS  # the table the CLI builds its parser from


def build(name: str, values: dict[str, object]) -> Command:
    """The typed command `name` from each of its fields' values (by `dest`), as the validators gave them."""
    make = _SPECS[name].make
    if make is None:
        raise KeyError(f"{name} is not built from fields")
    return make(**values)


def _example_envs(env_names: Sequence[str]) -> tuple[str, str]:
    non_prod = [e for e in env_names if e != "production"] or list(env_names) or ["poc"]
    one = non_prod[-1]
    two = ",".join(non_prod[-2:]) if len(non_prod) >= 2 else one
    return one, two


def _examples(name: str, env_names: Sequence[str], prog: str) -> list[str]:
    one, two = _example_envs(env_names)
    return [f"`{prog} {ex.format(env=one, envs=two)}`" for ex in _SPECS[name].examples]


def _syntax(name: str, prog: str) -> str:
    return " | ".join(f"`{prog} {alt.strip()}`" for alt in _SPECS[name].syntax.split("  |  "))


def help_text(topic: str | None, env_names: Sequence[str], *, prog: str = "/funnelcake") -> str:
    """The help a person reads: every command in brief, or one command with its examples."""
    envs = ", ".join(env_names) if env_names else "(none configured)"
    if topic is not None and topic in _SPECS:
        spec = _SPECS[topic]
        return (
            f"{_syntax(topic, prog)}\n{spec.summary}\n"
            f"Examples: {', '.join(_examples(topic, env_names, prog))}\n"
            f"Environments: {envs}. A commit is {REF_FORMS}."
        )
    lines = [f"{_syntax(name, prog)} — {spec.summary}" for name, spec in _SPECS.items()]
    lines.append(f"Environments: {envs}. `{prog} help <command>` shows examples.")
    return "\n".join(lines)
