"""The /funnelcake grammar: every form, every usage error, and a fuzz showing no input escapes as an exception."""

from __future__ import annotations

import random
import re
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot import commands
from bot.commands import (
    COMMAND_NAMES,
    DEFAULT_HISTORY_LIMIT,
    MAX_HISTORY_LIMIT,
    Deploy,
    Help,
    History,
    Lock,
    MigrateCommand,
    PlanCommand,
    Rollback,
    Status,
    Unlock,
    Usage,
    help_text,
    next_history,
    parse,
    ref_problem,
)

ENVS = ("production", "staging", "poc")


def usage(text: str) -> str:
    result = parse(text, ENVS)
    assert isinstance(result, Usage), f"{text!r} parsed as {result!r}"
    assert result.message
    return result.message


# ---- each form


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("deploy poc e7e79eb", Deploy(("poc",), "e7e79eb", dry_run=False)),
        ("deploy staging,poc e7e79eb", Deploy(("staging", "poc"), "e7e79eb")),
        ("deploy staging, poc e7e79eb", Deploy(("staging", "poc"), "e7e79eb")),
        ("deploy staging ,poc e7e79eb", Deploy(("staging", "poc"), "e7e79eb")),
        ("deploy production e7e79eb --dry-run", Deploy(("production",), "e7e79eb", dry_run=True)),
        ("deploy poc --dry-run e7e79eb", Deploy(("poc",), "e7e79eb", dry_run=True)),
        ("deploy poc e7e79eb \u2014dry-run", Deploy(("poc",), "e7e79eb", dry_run=True)),  # em dash
        ("deploy poc e7e79eb \u2013dry-run", Deploy(("poc",), "e7e79eb", dry_run=True)),  # en dash
        ("deploy poc e7e79eb --dry_run", Deploy(("poc",), "e7e79eb", dry_run=True)),
        ("DEPLOY Poc e7e79eb", Deploy(("poc",), "e7e79eb")),
        ("deploy poc " + "a" * 40, Deploy(("poc",), "a" * 40)),
        ("deploy poc main", Deploy(("poc",), "main")),
        ("deploy poc v1.4.2", Deploy(("poc",), "v1.4.2")),
        ("deploy poc release/2024-06", Deploy(("poc",), "release/2024-06")),
        ("deploy poc decaf", Deploy(("poc",), "decaf")),  # a word made of hex letters is a branch
        ("deploy\u00a0poc\u2003e7e79eb", Deploy(("poc",), "e7e79eb")),  # non-breaking / em spaces
        ("deploy poc\u200be7e79eb", Deploy(("poc",), "e7e79eb")),  # zero-width space
        ("  deploy   poc\te7e79eb\n", Deploy(("poc",), "e7e79eb")),
        ("plan staging e7e79eb", PlanCommand(("staging",), "e7e79eb")),
        ("plan production,staging main", PlanCommand(("production", "staging"), "main")),
        ("status", Status()),
        ("Status", Status()),
        ("migrate staging e7e79eb", MigrateCommand("staging", "e7e79eb", None)),
        ("migrate staging force 3", MigrateCommand("staging", None, 3)),
        ("migrate staging FORCE 20240101120000", MigrateCommand("staging", None, 20240101120000)),
        ("rollback production", Rollback("production")),
        ("history", History(None, DEFAULT_HISTORY_LIMIT)),
        ("history poc", History("poc", DEFAULT_HISTORY_LIMIT)),
        ("history --limit 5", History(None, 5)),
        ("history poc --limit=25", History("poc", 25)),
        ("history \u2014limit 3 staging", History("staging", 3)),
        ("history poc --before d-4k7q2m", History("poc", DEFAULT_HISTORY_LIMIT, "d-4k7q2m")),
        ("history --limit 5 --before=d-old001", History(None, 5, "d-old001")),
        ("lock production release freeze until 18:00", Lock("production", "release freeze until 18:00")),
        ("lock poc load test -- do not deploy", Lock("poc", "load test -- do not deploy")),
        ("lock poc ops &amp; infra &lt;3", Lock("poc", "ops & infra <3")),
        ("lock poc freeze\u202e until\x07 friday", Lock("poc", "freeze until friday")),
        ("unlock production", Unlock("production")),
        ("", Help(None)),
        ("   ", Help(None)),
        ("help", Help(None)),
        ("help migrate", Help("migrate")),
        ("HELP Deploy", Help("deploy")),
        ("--help", Help(None)),
        ("deploy --help", Help("deploy")),
        ("migrate \u2014help", Help("migrate")),
    ],
)
def test_forms(text: str, expected: object) -> None:
    assert parse(text, ENVS) == expected


def test_env_names_come_from_the_config() -> None:
    assert parse("deploy qa e7e79eb", ["qa", "prod"]) == Deploy(("qa",), "e7e79eb")
    msg = usage_for("deploy poc e7e79eb", ["qa", "prod"])
    assert "Unknown environment `poc`" in msg and "`qa`, `prod`" in msg and "staging" not in msg


def usage_for(text: str, envs: list[str]) -> str:
    result = parse(text, envs)
    assert isinstance(result, Usage)
    return result.message


# ---- each usage error


def test_unknown_env_lists_valid_ones_and_suggests_the_closest() -> None:
    msg = usage("deploy prod e7e79eb")
    assert "Unknown environment `prod`" in msg
    assert "Did you mean `production`?" in msg
    assert "`production`, `staging`, `poc`" in msg
    assert "Did you mean `staging`?" in usage("deploy stagin e7e79eb")
    assert "Did you mean" not in usage("deploy mars e7e79eb")


def test_swapped_env_and_commit_is_explained() -> None:
    assert "environment comes first" in usage("deploy e7e79eb poc")


def test_bad_commits_show_the_accepted_forms() -> None:
    for text, why in [
        ("deploy poc e7e79e", "only 6 characters"),
        ("deploy poc " + "ab12" * 11, "at most 40"),
        ("deploy poc foo..bar", "`..`"),
        ("deploy poc foo~1", "~"),
        ("deploy poc HEAD^", "^"),
        ("deploy poc a:b", ":"),
        ("deploy poc wh?t", "?"),
        ("deploy poc fix*", "*"),
        ("deploy poc [x]", "["),
        ("deploy poc a\\b", "\\"),
        ("deploy poc feature/", "empty part"),
        ("deploy poc a//b", "empty part"),
        ("deploy poc .hidden", "starts with `.`"),
        ("deploy poc v1.", "ends with `.`"),
        ("deploy poc main.lock", "`.lock`"),
        ("deploy poc x@{1}", "@{"),
        ("deploy poc " + "b" * 101, "longer than 100"),
        ("deploy poc ma\x07in", "control character"),
        ("deploy poc", "needs a commit"),
    ]:
        msg = usage(text)
        assert why in msg, (text, msg)
        assert "7 to 40 hex characters" in msg, text


def test_leading_dash_ref_is_never_taken_as_a_commit() -> None:
    assert "is not an option of `deploy`" in usage("deploy poc -e7e79eb")


def test_duplicate_and_empty_env_entries() -> None:
    assert "listed twice" in usage("deploy poc,poc e7e79eb")
    assert "listed twice" in usage("deploy POC,poc e7e79eb")
    assert "empty entry" in usage("deploy poc,,staging e7e79eb")
    # `poc, x` is the list `poc,x` (a space after the comma is allowed), so the commit is read as an env
    assert usage("deploy poc, e7e79eb").startswith(
        "Unknown environment `e7e79eb`. (The environment comes first, then the commit.)"
    )


def test_unknown_command_suggests_the_closest() -> None:
    msg = usage("deplyo poc e7e79eb")
    assert "Unknown command `deplyo`" in msg and "Did you mean `deploy`?" in msg
    assert "Did you mean `rollback`?" in usage("rolback poc")
    assert "Unknown help topic `frobnicate`" in usage("help frobnicate")


def test_other_usage_errors() -> None:
    assert "needs an environment" in usage("deploy")
    assert "is not an option of `deploy`" in usage("deploy poc e7e79eb --force")
    assert "Unexpected `extra`" in usage("deploy poc e7e79eb extra")
    assert "takes no arguments" in usage("status poc")
    assert "needs the version" in usage("migrate poc force")
    assert "not a migration version" in usage("migrate poc force three")
    assert "not a migration version" in usage("migrate poc force -1")
    assert "not a migration version" in usage("migrate poc force \uff13")  # a full-width digit
    assert "needs a commit" in usage("migrate poc")
    assert "one environment at a time" in usage("rollback staging,poc")
    assert "needs an environment" in usage("rollback")
    assert "Unexpected" in usage("unlock poc now")
    assert "from 1 to 100" in usage("history --limit 0")
    assert "from 1 to 100" in usage(f"history --limit {MAX_HISTORY_LIMIT + 1}")
    assert "from 1 to 100" in usage("history --limit many")
    assert "needs a value" in usage("history --limit")
    assert "Say why" in usage("lock poc")
    assert "Say why" in usage("lock staging \x08")  # found by the fuzz: a backspace is no reason
    assert "keep it under" in usage("lock poc " + "x" * 400)
    assert "No environments are configured" in usage_for("deploy poc e7e79eb", [])


def test_usage_shows_the_syntax_and_an_example() -> None:
    msg = usage("deploy prod e7e79eb")
    assert (
        "Usage: `/funnelcake deploy <env>[,<env>…] <commit> [--dry-run] [--allow-downgrade] [--override <reason…>]`"
        in msg
    )
    assert "`/funnelcake deploy poc e7e79eb`" in msg


def test_echoed_input_cannot_mention_anyone_or_break_formatting() -> None:
    msg = usage("deploy <!channel> e7e79eb")
    assert "<!channel>" not in msg and "&lt;!channel&gt;" in msg
    assert "<@U0BOB>" not in usage("<@U0BOB>")
    assert "```" not in usage("deploy ```boom``` e7e79eb")
    assert "garble" in usage("deploy poc `boom`")
    assert len(usage("deploy " + "x" * 3000 + " e7e79eb")) < 3000


def test_help_explains_every_command_with_an_example() -> None:
    overview = help_text(None, ENVS)
    for name in COMMAND_NAMES:
        assert f"`/funnelcake {name}" in overview
        detail = help_text(name, ENVS)
        assert "Examples: `/funnelcake " in detail
    assert "production, staging, poc" in overview
    assert "force 3" in help_text("migrate", ENVS)
    assert help_text("deploy", ENVS, prog="funnelcake").startswith("`funnelcake deploy")


# ---- refs agree with git


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.text(
        alphabet=st.sampled_from([*"abcXYZ019-./_@{}~^:?*[\\ \tlok", "é", "\x7f"]),
        min_size=1,
        max_size=20,
    )
)
def test_every_ref_we_accept_git_accepts(ref: str) -> None:
    if ref_problem(ref) is None:
        done = subprocess.run(
            ["git", "check-ref-format", "--allow-onelevel", ref], capture_output=True, timeout=10, check=False
        )
        assert done.returncode == 0, ref


# ---- fuzz

_HEX_REF = re.compile(r"^[0-9a-fA-F]{7,40}$")


def _independent_ref_ok(ref: str) -> bool:
    if _HEX_REF.match(ref):
        return True
    return (
        0 < len(ref) <= 100
        and not ref.startswith("-")
        and ".." not in ref
        and not any(c in "~^:?*[\\<>`" for c in ref)
        and all(c.isprintable() and not c.isspace() for c in ref)
        and "@{" not in ref
        and ref != "@"
        and not ref.endswith((".", "/"))
        and not ref.startswith("/")
        and "//" not in ref
        and not any(p.startswith(".") or p.endswith(".lock") for p in ref.split("/"))
    )


_VOCAB = [
    *(v for w in (*COMMAND_NAMES, *ENVS) for v in (w, w.upper(), w.capitalize())),
    *["prod", "stage", "po", "production,staging", "staging,poc,", ",poc", "poc,poc", "all"],
    *[
        "main",
        "v1.4.2",
        "HEAD",
        "HEAD~1",
        "a..b",
        "feature/x",
        "x.lock",
        ".x",
        "@",
        "-rf",
        "e7e79eb",
        "e7e79e",
    ],
    *["--dry-run", "\u2014dry-run", "\u2013dry-run", "-dry-run", "--limit", "--limit=5", "--help", "-h", "?"],
    *["force", "FORCE", "0", "3", "-1", "99999999999999999999999", "1e3", "\u0663"],
    *["&lt;!channel&gt;", "<@U0BOB>", "`", "```", "&amp;", "\x00", "\u202e", "\u00ad", "\ufeff"],
    *[
        "\uff44\uff45\uff50\uff4c\uff4f\uff59",
        "p\u043ec",
        "stag\u0131ng",
        "\U0001f680",
        "\x7f",
        "\\",
        "\u2028",
    ],
]
_SEPARATORS = [" ", "  ", "\u00a0", "\u2003", "\t", "\n", "\u200b", ", ", ",", "\u3000"]


def _grammar_text(seed: int) -> str:
    """Grammar-shaped text from a seed: a command's template filled with good and bad words, then mutated.

    Built from one drawn integer because Hypothesis spends milliseconds per nested draw, and the
    fuzz needs 10,000 inputs quickly; the failing text is in the assertion message either way.
    """
    rnd = random.Random(seed)

    def case(w: str) -> str:
        return rnd.choice([w, w.upper(), w.capitalize()])

    def env() -> str:
        return case(rnd.choice(ENVS)) if rnd.random() < 0.85 else rnd.choice(_VOCAB)

    def hex_ref() -> str:
        return "".join(rnd.choice("0123456789abcdefABCDEF") for _ in range(rnd.randint(1, 45)))

    def ref() -> str:
        return hex_ref() if rnd.random() < 0.6 else rnd.choice(_VOCAB)

    def junk() -> str:
        if rnd.random() < 0.7:
            return rnd.choice(_VOCAB)
        return "".join(chr(rnd.randint(0, 0x2FFF)) for _ in range(rnd.randint(1, 8)))

    cmd = rnd.choice(COMMAND_NAMES) if rnd.random() < 0.85 else junk()
    words = [case(cmd)]
    if cmd in ("deploy", "plan"):
        words += [",".join(env() for _ in range(rnd.randint(1, 3))), ref()]
        if rnd.random() < 0.4:
            words.append(rnd.choice(["--dry-run", "\u2014dry-run", "\u2013dry-run", "--dry_run", "--force"]))
    elif cmd == "migrate":
        words.append(env())
        words += ["force", str(rnd.randint(-2, 10**20))] if rnd.random() < 0.4 else [ref()]
    elif cmd in ("rollback", "unlock"):
        words.append(env())
    elif cmd == "history":
        if rnd.random() < 0.6:
            words.append(env())
        if rnd.random() < 0.5:
            words += [rnd.choice(["--limit", "\u2014limit"]), str(rnd.randint(-1, 150))]
    elif cmd == "lock":
        words += [env()] + [junk() for _ in range(rnd.randint(0, 4))]
    elif cmd == "help" and rnd.random() < 0.6:
        words.append(case(rnd.choice(COMMAND_NAMES)))
    for _ in range(rnd.choice([0, 0, 0, 1, 2])):
        i = rnd.randrange(len(words) + 1)
        if rnd.random() < 0.5 and i < len(words):
            del words[i]
        else:
            words.insert(i, junk())
    return "".join(rnd.choice(_SEPARATORS) + w if i else w for i, w in enumerate(words))


_separators = st.sampled_from(_SEPARATORS)


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=120), st.integers(0, 2**64).map(_grammar_text)))
def test_fuzz_every_input_is_a_valid_command_or_a_usage(text: str) -> None:
    result = parse(text, ENVS)
    if isinstance(result, Usage):
        assert result.message.strip()
        assert re.search(r"<[!@#]", result.message) is None, result.message
        assert len(result.message) < 3000
        return
    if isinstance(result, Deploy | PlanCommand):
        assert result.envs
        assert len(set(result.envs)) == len(result.envs)
        assert all(e in ENVS for e in result.envs)
        assert _independent_ref_ok(result.ref), result.ref
    elif isinstance(result, MigrateCommand):
        assert result.env in ENVS
        assert (result.ref is None) != (result.force_version is None)
        if result.ref is not None:
            assert _independent_ref_ok(result.ref), result.ref
        if result.force_version is not None:
            assert 0 <= result.force_version < 2**64
    elif isinstance(result, Rollback | Unlock):
        assert result.env in ENVS
    elif isinstance(result, History):
        assert result.env is None or result.env in ENVS
        assert 1 <= result.limit <= MAX_HISTORY_LIMIT
    elif isinstance(result, Lock):
        assert result.env in ENVS
        assert result.reason.strip() and result.reason.isprintable()
    elif isinstance(result, Help):
        assert result.topic is None or result.topic in COMMAND_NAMES
    else:
        assert isinstance(result, Status)


@settings(max_examples=500, deadline=None)
@given(
    envs=st.lists(st.sampled_from(ENVS), min_size=1, max_size=3, unique=True),
    ref=st.text(alphabet="0123456789abcdef", min_size=7, max_size=40),
    dry_run=st.booleans(),
    sep=_separators.filter(lambda s: "," not in s),
)
def test_fuzz_well_formed_deploys_round_trip(envs: list[str], ref: str, dry_run: bool, sep: str) -> None:
    text = sep.join(
        ["deploy", ",".join(e.upper() for e in envs), ref] + (["\u2014dry-run"] if dry_run else [])
    )
    assert parse(text, ENVS) == Deploy(tuple(envs), ref, dry_run=dry_run)


def test_override_takes_the_rest_of_the_line_as_its_reason() -> None:
    envs = ["production", "staging", "poc"]
    parsed = commands.parse(
        "deploy production e7e79eb --allow-downgrade --override staging is down, hotfix", envs
    )
    assert parsed == commands.Deploy(
        ("production",), "e7e79eb", allow_downgrade=True, override="staging is down, hotfix"
    )
    missing = commands.parse("deploy production e7e79eb --override", envs)
    assert isinstance(missing, commands.Usage)
    assert "`--override` needs the reason" in missing.message


def test_history_before_takes_a_deploy_id_and_pages_say_what_to_type_next() -> None:
    for bad in (
        "history --before",
        "history --before D-ABC",
        "history --before d-4k7q2m;drop",
        "history --before ../x",
    ):
        msg = usage(bad)
        assert "--before" in msg
    assert "deploy id" in usage("history poc --before <@U0ALICE>")
    assert next_history(History(None), "d-4k7q2m") == "history --before d-4k7q2m"
    assert (
        next_history(History("poc", 5, "d-zzzzzz"), "d-4k7q2m") == "history poc --limit 5 --before d-4k7q2m"
    )
    # what a page says to type parses back to the next page of the same listing
    assert parse(next_history(History("poc", 5), "d-4k7q2m"), ENVS) == History("poc", 5, "d-4k7q2m")
