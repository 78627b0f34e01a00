"""The `/funnelcake` command grammar: text from Slack becomes a typed request or a usage message.

Pure code, no I/O. `parse` never raises: anything it cannot turn into a command comes back as a
`Usage` whose message says what was wrong and how to write it. Text from Slack arrives with HTML
entities escaped, typographic dashes (`--dry-run` can become `—dry-run`) and non-breaking or
zero-width spaces pasted from elsewhere; all of that is normalised before the words are read. The
fields' validators are the command table's (grammar.py), which the CLI's parser is built from.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from bot.commands.grammar import (
    _SPECS,
    COMMAND_NAMES,
    DEFAULT_HISTORY_LIMIT,
    DEPLOY_ID_RE,
    MAX_HISTORY_LIMIT,
    MAX_MIGRATION_VERSION,
    MAX_REASON_LENGTH,
    SPECS,
    Command,
    Deploy,
    Field,
    FieldContext,
    FieldError,
    Help,
    History,
    Lock,
    MigrateCommand,
    PlanCommand,
    Read,
    Rollback,
    Spec,
    Status,
    T,
    Unlock,
    Usage,
    _examples,
    _syntax,
    build,
    help_text,
    next_history,
    read_before,
    read_env,
    read_envs,
    read_limit,
    read_lock_reason,
    read_override,
    read_ref,
    show,
)
from bot.commands.refs import MAX_REF_LENGTH, REF_FORMS, is_valid_ref, ref_problem

# The command types, specs and help text live in grammar.py; every public name is still found here.
__all__ = [
    "COMMAND_NAMES",
    "DEFAULT_HISTORY_LIMIT",
    "DEPLOY_ID_RE",
    "MAX_HISTORY_LIMIT",
    "MAX_MIGRATION_VERSION",
    "MAX_REASON_LENGTH",
    "MAX_REF_LENGTH",
    "REF_FORMS",
    "SPECS",
    "Command",
    "Deploy",
    "Field",
    "FieldContext",
    "FieldError",
    "Help",
    "History",
    "Lock",
    "MigrateCommand",
    "PlanCommand",
    "Rollback",
    "Spec",
    "Status",
    "Unlock",
    "Usage",
    "build",
    "help_text",
    "is_valid_ref",
    "next_history",
    "parse",
    "ref_problem",
    "usage",
]

# Typographic dashes Slack or a phone keyboard may put where the user typed `-` or `--`.
_DASHES = "-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"
# Invisible characters that arrive in pasted text and separate words without being whitespace.
_INVISIBLE_SEPARATORS = str.maketrans(
    {"\u200b": " ", "\u200c": " ", "\u200d": " ", "\u2060": " ", "\ufeff": " "}
)
_SOFT_HYPHEN = "\u00ad"


def _fold(option: str) -> str:
    return "".join(c for c in option.casefold() if c not in _DASHES and c != "_")


# How an option is written in a message: `--limit N`, from the command table.
_OPTION_DISPLAY = {
    _fold(f.option): f"{f.option} {f.metavar}" if f.metavar else f.option
    for spec in _SPECS.values()
    for f in spec.fields
    if f.option
}


def usage(problem: str, name: str | None, env_names: Sequence[str], prog: str) -> Usage:
    """`problem`, then how to write command `name` (or every command's help when there is none)."""
    if name is None:
        return Usage(f"{problem}\n{help_text(None, env_names, prog=prog)}", None)
    return Usage(
        f"{problem}\nUsage: {_syntax(name, prog)} — e.g. {', '.join(_examples(name, env_names, prog))}",
        name,
    )


def _normalise(text: str) -> str:
    # Slack escapes these three in command text; a lock reason should read as typed.
    text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return text.translate(_INVISIBLE_SEPARATORS).replace(_SOFT_HYPHEN, "")


def _is_flag(token: str) -> bool:
    # `-1` is a (bad) number, not an option: it reaches the check that can say what is wrong with it.
    return len(token) > 1 and token[0] in _DASHES and not token.lstrip(_DASHES)[:1].isdigit()


def _flag_name(token: str) -> tuple[str, str | None]:
    """`—dry-run` → ("dryrun", None), `--limit=5` → ("limit", "5"): dashes and underscores ignored."""
    body = token.lstrip(_DASHES)
    value: str | None = None
    if "=" in body:
        body, value = body.split("=", 1)
    return _fold(body), value


class _Reader:
    """The words after the command name, with options taken out as they are recognised."""

    def __init__(self, name: str, words: list[str], env_names: Sequence[str], prog: str) -> None:
        self.name = name
        self.words = words
        self.env_names = list(env_names)
        self.prog = prog

    def usage(self, problem: str) -> Usage:
        return usage(problem, self.name, self.env_names, self.prog)

    def options(self, allowed: dict[str, bool]) -> tuple[list[str], dict[str, str | None]] | Usage:
        """Split words into positionals and options; `allowed` maps option name → takes a value."""
        positionals: list[str] = []
        found: dict[str, str | None] = {}
        i = 0
        while i < len(self.words):
            word = self.words[i]
            i += 1
            if not _is_flag(word):
                positionals.append(word)
                continue
            name, value = _flag_name(word)
            if name == "help":
                found["help"] = None
                continue
            if name not in allowed:
                accepted = ", ".join(_OPTION_DISPLAY.get(n, f"--{n}") for n in allowed) or "no options"
                return self.usage(f"{show(word)} is not an option of `{self.name}` (it accepts {accepted}).")
            if allowed[name] and value is None:
                if i >= len(self.words):
                    return self.usage(f"`--{name}` needs a value.")
                value = self.words[i]
                i += 1
            found[name] = value
        return positionals, found

    def read(self, read: Read[T], text: str) -> T | Usage:
        """The field's value by its validator, or this command's usage with the validator's problem."""
        try:
            return read(text, FieldContext(self.name, self.env_names))
        except FieldError as e:
            return self.usage(str(e))

    def env_list(self, positionals: list[str]) -> tuple[tuple[str, ...], list[str]] | Usage:
        """Read `a,b` (also `a, b` or `a ,b`) from the front of positionals; return envs and the rest."""
        if not positionals:
            return self.usage(f"`{self.name}` needs an environment.")
        joined = positionals[0]
        rest = positionals[1:]
        while rest and (joined.endswith(",") or rest[0].startswith(",")):
            joined += rest.pop(0)
        envs = self.read(read_envs, joined)
        return envs if isinstance(envs, Usage) else (envs, rest)

    def ref(self, token: str | None) -> str | Usage:
        if token is None:
            return self.usage(f"`{self.name}` needs a commit: {REF_FORMS}.")
        return self.read(read_ref, token)

    def no_more(self, rest: list[str]) -> Usage | None:
        if rest:
            extra = " ".join(rest)
            return self.usage(f"Unexpected {show(extra)} after `{self.name}`.")
        return None


def _deploy(r: _Reader, *, plan: bool) -> Command | Usage:
    # `--override <reason…>` takes the rest of the line: the reason is free text, like a lock's.
    override: str | None = None
    at = next((i for i, w in enumerate(r.words) if _is_flag(w) and _flag_name(w)[0] == "override"), None)
    if at is not None:
        reason = r.read(read_override, " ".join(r.words[at + 1 :]))
        r.words = r.words[:at]
        if isinstance(reason, Usage):
            return reason
        override = reason
    opts = r.options({"allowdowngrade": False} if plan else {"dryrun": False, "allowdowngrade": False})
    if isinstance(opts, Usage):
        return opts
    positionals, found = opts
    if "help" in found:
        return Help(r.name)
    allow = "allowdowngrade" in found
    envs = r.env_list(positionals)
    if isinstance(envs, Usage):
        return envs
    env_tuple, rest = envs
    ref = r.ref(rest[0] if rest else None)
    if isinstance(ref, Usage):
        return ref
    extra = r.no_more(rest[1:])
    if extra is not None:
        return extra
    if plan:
        return PlanCommand(env_tuple, ref, allow_downgrade=allow, override=override)
    return Deploy(env_tuple, ref, dry_run="dryrun" in found, allow_downgrade=allow, override=override)


def _single_env(r: _Reader, positionals: list[str]) -> tuple[str, list[str]] | Usage:
    if not positionals:
        return r.usage(f"`{r.name}` needs an environment.")
    env = r.read(read_env, positionals[0])
    if isinstance(env, Usage):
        return env
    return env, positionals[1:]


def _env_first(
    r: _Reader, allowed: dict[str, bool] | None = None
) -> tuple[str, list[str], set[str]] | Help | Usage:
    """The single environment a command starts with, the words after it and the flags given; Help for `--help`."""
    opts = r.options(allowed or {})
    if isinstance(opts, Usage):
        return opts
    positionals, found = opts
    if "help" in found:
        return Help(r.name)
    head = _single_env(r, positionals)
    if isinstance(head, Usage):
        return head
    env, rest = head
    return env, list(rest), set(found)


def _migrate(r: _Reader) -> Command | Usage:
    head = _env_first(r)
    if isinstance(head, Help | Usage):
        return head
    env, rest, _ = head
    if rest and rest[0].casefold() == "force":
        if len(rest) < 2:
            return r.usage("`force` needs the version from `Dirty database version X`.")
        version = rest[1]
        if not version.isascii() or not version.isdigit() or int(version) > MAX_MIGRATION_VERSION:
            return r.usage(
                f"{show(version)} is not a migration version: give the number X from `Dirty database version X`."
            )
        extra = r.no_more(rest[2:])
        if extra is not None:
            return extra
        return MigrateCommand(env, None, int(version))
    ref = r.ref(rest[0] if rest else None)
    if isinstance(ref, Usage):
        return ref
    extra = r.no_more(rest[1:])
    if extra is not None:
        return extra
    return MigrateCommand(env, ref, None)


def _env_only(r: _Reader, allowed: dict[str, bool] | None = None) -> tuple[str, set[str]] | Help | Usage:
    """The single environment of `rollback` / `unlock` and the flags given, or Help for `--help`."""
    head = _env_first(r, allowed)
    if isinstance(head, Help | Usage):
        return head
    env, rest, found = head
    extra = r.no_more(rest)
    if extra is not None:
        return extra
    return env, found


def _history(r: _Reader) -> Command | Usage:
    opts = r.options({"limit": True, "before": True})
    if isinstance(opts, Usage):
        return opts
    positionals, found = opts
    if "help" in found:
        return Help(r.name)
    raw_before = found.get("before")
    before = None if raw_before is None else r.read(read_before, raw_before)
    if isinstance(before, Usage):
        return before
    limit = r.read(read_limit, found["limit"] or "") if "limit" in found else DEFAULT_HISTORY_LIMIT
    if isinstance(limit, Usage):
        return limit
    if not positionals:
        return History(None, limit, before)
    head = _single_env(r, positionals)
    if isinstance(head, Usage):
        return head
    env, rest = head
    extra = r.no_more(rest)
    if extra is not None:
        return extra
    return History(env, limit, before)


def _lock(r: _Reader) -> Command | Usage:
    # The reason is free text: a `--` in it is not an option.
    if r.words and _is_flag(r.words[0]) and _flag_name(r.words[0])[0] == "help":
        return Help(r.name)
    head = _single_env(r, r.words)
    if isinstance(head, Usage):
        return head
    env, rest = head
    reason = r.read(read_lock_reason, " ".join(rest))
    return reason if isinstance(reason, Usage) else Lock(env, reason)


def _help(r: _Reader) -> Command | Usage:
    words = [w for w in r.words if not _is_flag(w)]
    if not words:
        return Help(None)
    topic = words[0].casefold()
    if topic in _SPECS:
        return Help(topic)
    return _unknown_command(words[0], r.env_names, r.prog, what="help topic")


def _unknown_command(word: str, env_names: Sequence[str], prog: str, *, what: str = "command") -> Usage:
    problem = f"Unknown {what} {show(word)}."
    close = difflib.get_close_matches(word.casefold(), COMMAND_NAMES, n=1, cutoff=0.6)
    if close:
        problem += f" Did you mean `{close[0]}`?"
    return usage(problem, None, env_names, prog)


def parse(text: str, env_names: Sequence[str], *, prog: str = "/funnelcake") -> Command | Usage:
    """Read `/funnelcake` text; a Command when it is well formed, otherwise a Usage saying how to fix it."""
    words = _normalise(text).split()
    if not words:
        return Help(None)
    first = words[0]
    if (_is_flag(first) and _flag_name(first)[0] in ("help", "h")) or first == "?":
        return Help(None)
    name = first.casefold()
    if name not in _SPECS:
        return _unknown_command(first, env_names, prog)
    r = _Reader(name, words[1:], env_names, prog)
    if name in ("deploy", "plan"):
        return _deploy(r, plan=name == "plan")
    if name == "status":
        opts = r.options({})
        if isinstance(opts, Usage):
            return opts
        positionals, found = opts
        if "help" in found:
            return Help(name)
        if positionals:
            return r.usage(
                f"`status` reports every environment and takes no arguments (got {show(' '.join(positionals))})."
            )
        return Status()
    if name == "migrate":
        return _migrate(r)
    if name in ("rollback", "unlock"):
        got = _env_only(r, {"allowdowngrade": False} if name == "rollback" else None)
        if not isinstance(got, tuple):
            return got
        env, flags = got
        return Rollback(env, allow_downgrade="allowdowngrade" in flags) if name == "rollback" else Unlock(env)
    if name == "history":
        return _history(r)
    if name == "lock":
        return _lock(r)
    return _help(r)
