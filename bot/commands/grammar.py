"""The `/funnelcake` command grammar: the commands a person can type, their specs and the help text.

Pure code, no I/O. Split out of bot.commands, which parses text into these types and re-exports every
public name here, so `from bot.commands import Deploy` and `commands.help_text(...)` keep working.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bot.commands.refs import REF_FORMS

# Deploys and history lists are posted to Slack; a bound keeps a reply within one message.
DEFAULT_HISTORY_LIMIT = 10
MAX_HISTORY_LIMIT = 100
MAX_REASON_LENGTH = 300
# golang-migrate versions are unsigned 64-bit integers (often timestamps such as 20240101120000).
MAX_MIGRATION_VERSION = 2**64 - 1


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


@dataclass(frozen=True)
class _Spec:
    syntax: str
    summary: str
    examples: tuple[str, ...]


_SPECS: dict[str, _Spec] = {
    "deploy": _Spec(
        "deploy <env>[,<env>…] <commit> [--dry-run] [--allow-downgrade] [--override <reason…>]",
        "Deploy a commit of funnelcake (api, relay, and migrations when they changed) to one or more "
        "environments. Production runs only after a second person approves. With --dry-run, only "
        "shows the plan. Moving an environment back to an older commit needs --allow-downgrade. An "
        "admin can go past a promotion gate (e.g. production takes what succeeded in staging) with "
        "--override and the reason, which ends the command.",
        ("deploy {env} e7e79eb", "deploy {envs} e7e79eb --dry-run"),
    ),
    "plan": _Spec(
        "plan <env>[,<env>…] <commit> [--allow-downgrade]",
        "Show what a deploy would do (images to promote or build, migrations, overlay changes) "
        "without touching anything; the same as deploy --dry-run.",
        ("plan {env} e7e79eb",),
    ),
    "status": _Spec(
        "status",
        "Compare every environment: tag in the GitOps overlay, live image, image in the registry, "
        "Argo CD sync and health, pods, and how far each environment is behind production.",
        ("status",),
    ),
    "migrate": _Spec(
        "migrate <env> <commit>  |  migrate <env> force <version>",
        "Run a commit's ClickHouse migrations in an environment (how to reach ClickHouse comes from "
        "the environment's configuration). After a failed run leaves `Dirty database version X`, "
        "`force X` marks version X as clean; then run migrate again.",
        ("migrate {env} e7e79eb", "migrate {env} force 3"),
    ),
    "rollback": _Spec(
        "rollback <env> [--allow-downgrade]",
        "Deploy the previously deployed commit of an environment again. Back across a migration "
        "(which stays applied) it needs --allow-downgrade.",
        ("rollback {env}",),
    ),
    "history": _Spec(
        "history [env] [--limit N] [--before ID]",
        f"List recent deploys, newest first ({DEFAULT_HISTORY_LIMIT} by default, at most {MAX_HISTORY_LIMIT}); "
        "`--before ID` lists the ones older than deploy ID (a full page ends by saying what to type).",
        ("history", "history {env} --limit 5"),
    ),
    "lock": _Spec(
        "lock <env> <reason…>",
        "Refuse deploys to an environment until it is unlocked; the reason is shown to whoever tries.",
        ("lock {env} load test until 15:00",),
    ),
    "unlock": _Spec(
        "unlock <env>",
        "Allow deploys to a locked environment again.",
        ("unlock {env}",),
    ),
    "help": _Spec(
        "help [command]",
        "Explain every command, or one command in detail.",
        ("help", "help deploy"),
    ),
}
COMMAND_NAMES: tuple[str, ...] = tuple(_SPECS)


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
