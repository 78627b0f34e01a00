"""The `funnelcake` CLI through its real entry point: `main([...])` in-process and `python -m bot.cli`, on one sandbox."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import pwd
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import yaml

from bot import commands
from bot.cli import main
from bot.colour import colour_enabled
from bot.ledger import DeployState, Ledger
from bot.pipeline.engine import StepEvent
from bot.pipeline.events import Diagnosed
from bot.pipeline.vocab import EventKind
from bot.service import DeployService
from bot.terminal import TerminalReporter
from tests.testbed.gitrepos import remote_head
from tests.testbed.kube.kubeconfig import CONTEXTS, PLUGIN, plugin_env, write_kubeconfig
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import FakeSlack

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES = ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate")
EXECUTE = ("resolve", "preflight", "images", "migrate", "gitops", "sync", "rollout", "verify")


@dataclass
class Run:
    code: int
    out: str
    err: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sb(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Sandbox]:
    """One sandbox for the module: each test leaves it deployable (no lock, no lease held)."""
    box = Sandbox(root=tmp_path_factory.mktemp("cli") / "sandbox")
    await box.start()
    try:
        yield box
    finally:
        await box.stop()


OPERATOR = "U0OPS"  # the Slack user the OS user running the tests is mapped to


def with_operators(sb: Sandbox, name: str, operators: list[dict[str, object]]) -> Path:
    """The sandbox's environments file plus an `operators` table (and production's deploy channel)."""
    data = yaml.safe_load(sb.config_path.read_text())
    data["operators"] = operators
    for env in data["environments"]:
        if env["name"] == "production":
            env["channel"] = "C0DEPLOYS"
    path = sb.root / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def cli_env(sb: Sandbox) -> Iterator[dict[str, str]]:
    """The process environment that points the CLI at the sandbox, as a user would export it; the OS user
    is an operator who may impersonate (`--as U…`), as the team's automation account is."""
    s = sb.settings()
    me = pwd.getpwuid(os.getuid()).pw_name
    config = with_operators(sb, "cli.yaml", [{"os_user": me, "slack_user": OPERATOR, "impersonate": True}])
    env = {
        "FUNNELCAKE_CONFIG": str(config),
        "KUBECONFIG": str(s.kubeconfig),
        "DATABASE_URL": s.database_url,
        "WORK_DIR": str(s.work_dir),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


@pytest.fixture
async def cli(cli_env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> AsyncIterator[object]:
    """`await cli("deploy", "poc", ...)`: main() in a thread, so the sandbox keeps serving on this loop."""

    async def run(*argv: str) -> Run:
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return Run(code, out, err)

    return run


def _short(sb: Sandbox, label: str) -> str:
    assert sb.git is not None
    return sb.git.app.short(label)


async def _ci_built(sb: Sandbox, short: str) -> None:
    """CI pushed this commit's images to the production registry only (as in test_deploy_e2e)."""
    for image in IMAGES:
        await sb.registries.push("production", image, short, "multi", seed=f"{image}:{short}")


def _live_tag(sb: Sandbox, env: str, service: str = "funnelcake-relay") -> str:
    assert sb.clusters is not None
    dep = sb.clusters[env].store.get("deployments", "funnelcake", service)
    assert dep is not None
    image: str = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    return image.rsplit(":", 1)[1]


async def _subprocess(env: dict[str, str], *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        *argv,
        env={**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


# ---- through the sandbox ------------------------------------------------------------------------------


async def test_plan_prints_the_plan_and_touches_nothing(sb: Sandbox, cli) -> None:  # type: ignore[no-untyped-def]
    assert sb.git is not None
    short = _short(sb, "head")
    await _ci_built(sb, short)
    gitops_before = remote_head(sb.git.gitops.path)

    run = await cli("plan", "poc", short)

    assert run.code == 0, run.err
    assert f"Plan: deploy {short}" in run.out
    previous = _short(sb, "api-paginate")
    assert (
        f"  poc:\n    api {previous} → {short}: 3 commits ahead\n    relay {previous} → {short}: 3 commits ahead\n"
        in (run.out)
    )
    assert re.search(rf"funnelcake-relay:{short}\s+promote from production", run.out), run.out
    assert "migrations changed:" in run.out
    assert remote_head(sb.git.gitops.path) == gitops_before
    assert _live_tag(sb, "poc") == previous
    # --dry-run is the same plan
    dry = await cli("deploy", "poc", short, "--dry-run")
    assert dry.code == 0
    assert f"Plan: deploy {short}" in dry.out


async def test_usage_errors_exit_2_with_one_message(sb: Sandbox, cli) -> None:  # type: ignore[no-untyped-def]
    short = _short(sb, "head")
    bad_env = await cli("deploy", "pocc", short, "--yes")
    assert bad_env.code == 2
    assert bad_env.err.startswith("error: Unknown environment `pocc`. Did you mean `poc`?")
    for name in ("production", "staging", "poc"):
        assert f"`{name}`" in bad_env.err
    assert bad_env.out == ""

    cut_short = await cli("plan", "poc", short[:5])
    assert cut_short.code == 2
    assert "has only 5 characters" in cut_short.err

    unconfirmed = await cli("deploy", "poc", short)  # pytest's stdin is not a terminal
    assert unconfirmed.code == 2
    assert "pass --yes" in unconfirmed.err

    assert (await cli("history", "--limit", "0")).code == 2
    assert (await cli("deploy", "poc")).code == 2  # argparse: the commit is missing
    assert (await cli("migrate", "poc", "force")).code == 2
    assert (await cli("--help")).code == 0


async def test_a_mistake_gets_the_message_slack_gives_and_help_is_the_grammars(sb: Sandbox, cli) -> None:  # type: ignore[no-untyped-def]
    envs = ("production", "staging", "poc")
    for argv in (
        ["history", "--limit", "0"],
        ["history", "poc", "--before", "X!"],
        ["rollback", "poc,staging"],
        ["deploy", "poc,poc", "e7e79eb", "--yes"],
        ["lock", "poc", "\x07"],
    ):
        slack = commands.parse(" ".join(argv[:-1] if argv[-1] == "--yes" else argv), envs, prog="funnelcake")
        assert isinstance(slack, commands.Usage), argv
        run = await cli(*argv)
        assert (run.code, run.out) == (2, ""), argv
        assert run.err == f"error: {slack.message}\n", argv

    # `plan` takes --override as `deploy` does (and as Slack's plan does): an empty reason is refused
    empty = await cli("plan", "poc", "e7e79eb", "--override", " ")
    assert empty.code == 2
    assert "`--override` needs the reason" in empty.err

    described = await cli("rollback", "--help")
    assert described.code == 0
    summary = " ".join(commands.SPECS["rollback"].summary.split())
    assert summary in " ".join(described.out.split())
    assert "confirm rolling back across a migration boundary" in described.out


async def test_config_error_exits_2(
    sb: Sandbox, cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("FUNNELCAKE_CONFIG", str(tmp_path / "missing.yaml"))
    run = await cli("status")
    assert run.code == 2
    assert "cannot read the file" in run.err


async def test_deploy_poc_shows_the_steps_then_history_and_rollback(sb: Sandbox, cli) -> None:  # type: ignore[no-untyped-def]
    short = _short(sb, "head")
    previous = _live_tag(sb, "poc")
    await _ci_built(sb, short)

    run = await cli("deploy", "poc", short, "--yes", "--as", "U0ALICE")

    assert run.code == 0, run.out + run.err
    for step in EXECUTE:
        assert re.search(rf"^\[ *[0-9.]+s\] \d/8 [✓\u2013] {step} (done|skipped) in", run.out, re.M), (
            step,
            run.out,
        )
    assert f"poc/funnelcake-relay:{short} promoted from production" in run.out
    # verify's line says what the real relay answered: its NIP-11 version and the REQ→EOSE latency
    assert re.search(
        rf"verify done in [0-9.]+s: poc: relay NIP-11 version {short} · relay REQ→EOSE [0-9.]+ ms", run.out
    ), run.out
    assert "\x1b" not in run.out  # not a terminal: plain lines only
    final = run.out.strip().splitlines()[-1]
    assert re.match(rf"deploy (d-\w+) \({short} → poc\) succeeded in [0-9.]+s", final), final
    deploy_id = final.split()[1]
    assert _live_tag(sb, "poc") == short

    history = await cli("history", "poc", "--limit", "3")
    assert history.code == 0
    assert history.out.splitlines()[0].split()[:6] == ["id", "when", "kind", "envs", "commit", "state"]
    # id, date, time, kind, envs, commit, state, by, message
    row = history.out.splitlines()[1].split()
    assert row[0] == deploy_id
    assert row[3:9] == ["deploy", "poc", short, "succeeded", "U0ALICE", "deployed"]

    back = await cli("rollback", "poc", "--allow-downgrade")  # back across 000003_add_index
    assert back.code == 0, back.out + back.err
    assert re.search(rf"^rollback d-\w+ \({previous} → poc\) succeeded in", back.out, re.M), back.out
    assert _live_tag(sb, "poc") == previous


async def test_migrate_runs_only_the_migrations(sb: Sandbox, cli) -> None:  # type: ignore[no-untyped-def]
    assert sb.git is not None
    short = _short(sb, "head")
    await _ci_built(sb, short)
    gitops_before = remote_head(sb.git.gitops.path)
    live_before = _live_tag(sb, "staging")

    run = await cli("migrate", "staging", short)

    assert run.code == 0, run.out + run.err
    for step in ("resolve", "preflight", "images", "migrate"):
        assert re.search(rf"^\[ *[0-9.]+s\] \d/4 ✓ {step} done in", run.out, re.M), (step, run.out)
    assert f"staging/funnelcake-migrate:{short} promoted from production" in run.out
    assert re.search(rf"^migrate d-\w+ \({short} → staging\) succeeded", run.out, re.M), run.out
    # a migration run leaves the overlays and the workloads alone
    assert remote_head(sb.git.gitops.path) == gitops_before
    assert _live_tag(sb, "staging") == live_before


async def test_lock_refuses_a_deploy_with_who_why_since_then_unlock(sb: Sandbox, cli) -> None:  # type: ignore[no-untyped-def]
    short = _short(sb, "head")
    locked = await cli("lock", "poc", "load", "test", "until", "15:00", "--as", "U0BOB")
    assert locked.code == 0
    assert locked.out.startswith("poc locked by <@U0BOB> since ")
    before = await cli("history", "poc", "--limit", "100")

    refused = await cli("deploy", "poc", short, "--yes", "--as", "U0ALICE")

    # refused before anything is recorded or run: no steps, no deploy in the history
    assert refused.code == 1
    assert "lock" not in refused.out
    err = refused.err.splitlines()
    assert re.match(
        r"error: poc is locked by <@U0BOB> since \d{4}-\d\d-\d\d \d\d:\d\d UTC .*: load test until 15:00",
        err[0],
    ), err
    assert err[1].startswith("hint: ") and "unlock poc" in err[1], err
    assert (await cli("history", "poc", "--limit", "100")).out == before.out

    # the lock is Bob's: the operator (no admin) may not lift it; Bob may
    assert (await cli("unlock", "poc")).code == 3
    unlocked = await cli("unlock", "poc", "--as", "U0BOB")
    assert unlocked.code == 0
    assert "poc unlocked (it was locked by <@U0BOB>: load test until 15:00)" in unlocked.out


async def test_production_deploy_stops_at_awaiting_approval(sb: Sandbox, cli) -> None:  # type: ignore[no-untyped-def]
    assert sb.git is not None
    short = _short(sb, "head")
    await _ci_built(sb, short)
    gitops_before = remote_head(sb.git.gitops.path)

    # production's deployers are a Slack group: the CLI asks Slack, and posts the request to the channel
    async with FakeSlack() as slack:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLACK_BOT_TOKEN", slack.bot_token)
            mp.setenv("SLACK_API_URL", slack.api_url)
            run = await cli("deploy", "production", short, "--yes", "--as", "U0CAROL")
        [request] = [m for m in slack.messages("C0DEPLOYS") if m.ephemeral_to is None]

    assert run.code == 0, run.err
    match = re.search(rf"deploy (d-\w+) \({short} → production\): awaiting approval\.", run.out)
    assert match, run.out
    assert re.search(
        rf"approve it in Slack \(the request is in <#C0DEPLOYS>\) or with `funnelcake approve {match.group(1)}`;"
        r" nothing is changed until then \(the request expires at \d{4}-",
        run.out,
    ), run.out
    assert [b["action_id"] for b in request.buttons()] == ["approve", "deny"]
    assert remote_head(sb.git.gitops.path) == gitops_before
    ledger = await Ledger.open(sb.settings().database_url)
    try:
        record = await ledger.get_deploy(match.group(1))
    finally:
        await ledger.close()
    assert record.state is DeployState.AWAITING_APPROVAL
    assert record.requester == "U0CAROL"
    assert record.origin is not None and record.origin.startswith(f"cli:{pwd.getpwuid(os.getuid()).pw_name}@")


async def test_status_table_and_json_through_a_subprocess(sb: Sandbox, cli, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    table = await cli("status")
    assert table.code == 0
    for env in ("production", "staging", "poc"):
        assert f"\n{env}" in "\n" + table.out
    assert "findings:" in table.out
    # each env's relay row: the real relay's NIP-11 version and REQ→EOSE latency, or why it was skipped
    assert f"  endpoints: relay NIP-11 version {sb.relays['staging'].version} · relay REQ→EOSE " in table.out
    assert "  endpoints: relay and API checks skipped: no endpoints configured" in table.out

    proc = await _subprocess(cli_env, "status", "--json")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    report = json.loads(out)
    assert [e["env"] for e in report["envs"]] == ["production", "staging", "poc"]
    assert {r["service"] for r in report["envs"][0]["rows"]} == {"api", "relay"}
    assert [(c["check"], c["status"]) for c in report["envs"][2]["checks"]] == [
        ("relay NIP-11", "ok"),
        ("relay REQ→EOSE", "ok"),
        ("api /health", "ok"),
    ]
    assert isinstance(report["findings"], list)


async def test_ctrl_c_cancels_the_deploy_and_releases_its_lease(sb: Sandbox, cli_env: dict[str, str]) -> None:
    # production's commit: its images exist in the production registry, so poc promotes them
    short = _short(sb, "relay-tune")
    # poc already runs a newer commit (earlier tests): this is a confirmed downgrade
    proc = await _subprocess(cli_env, "deploy", "poc", short, "--yes", "--allow-downgrade")
    assert proc.stdout is not None
    assert proc.stderr is not None
    seen: list[str] = []
    async with asyncio.timeout(60):
        while line := (await proc.stdout.readline()).decode():
            seen.append(line)
            if "images started" in line:
                proc.send_signal(signal.SIGINT)
                break
        rest, err = await proc.communicate()
    output = "".join(seen) + rest.decode()

    assert proc.returncode == 130, output + err.decode()
    assert err.decode().startswith("cancelled: deploy d-")
    assert "Traceback" not in output + err.decode()
    deploy_id = err.decode().split()[2]
    ledger = await Ledger.open(sb.settings().database_url)
    try:
        record = await ledger.get_deploy(deploy_id)
        leases = await ledger.leases()
    finally:
        await ledger.close()
    assert record.state is DeployState.CANCELLED
    assert leases == []


async def test_ctrl_c_while_following_leaves_the_deploy_waiting(sb: Sandbox, cli_env: dict[str, str]) -> None:
    short = _short(sb, "head")
    await _ci_built(sb, short)
    async with FakeSlack() as slack:
        env = {**cli_env, "SLACK_BOT_TOKEN": slack.bot_token, "SLACK_API_URL": slack.api_url}
        proc = await _subprocess(env, "deploy", "production", short, "--yes", "--wait", "--as", "U0CAROL")
        assert proc.stdout is not None
        async with asyncio.timeout(60):
            while line := (await proc.stdout.readline()).decode():
                if "awaiting approval." in line:
                    deploy_id = line.split()[1]
                    proc.send_signal(signal.SIGINT)
                    break
            _, err = await proc.communicate()
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip() == f"stopped following deploy {deploy_id}; it goes on without this terminal"
    ledger = await Ledger.open(sb.settings().database_url)
    try:
        record = await ledger.get_deploy(deploy_id)
        await ledger.request_cancel(deploy_id, "U0CAROL")  # leave the module's sandbox deployable
    finally:
        await ledger.close()
    assert record.state is DeployState.AWAITING_APPROVAL  # another person may still approve it


def _converse(argv: list[str], env: dict[str, str], answer: bytes, limit: float = 60.0) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal, answer its [y/N] prompt, return (exit code, everything it drew)."""
    main_fd, tty_fd = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", *argv],
        env={**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "COLUMNS": "200"},
        cwd=REPO_ROOT,
        stdin=tty_fd,
        stdout=tty_fd,
        stderr=tty_fd,
        close_fds=True,
    )
    os.close(tty_fd)
    seen = b""
    answered = False
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(main_fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            if not answered and b"[y/N] " in seen:
                os.write(main_fd, answer)
                answered = True
            if proc.poll() is not None and not ready:
                break
        return proc.wait(timeout=max(deadline - time.monotonic(), 1)), seen.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main_fd)


async def test_on_a_terminal_deploy_asks_first_then_redraws_the_steps_in_place(
    sb: Sandbox, cli_env: dict[str, str]
) -> None:
    short = _short(sb, "add-index")  # staging runs it: poc gets its images from staging's registry
    argv = ["deploy", "poc", short, "--allow-downgrade"]  # poc runs a newer commit by now

    declined, shown = await asyncio.to_thread(_converse, argv, cli_env, b"n\n")
    assert declined == 1
    assert f"Plan: deploy {short}" in shown
    assert "not confirmed; nothing was deployed" in shown
    assert _live_tag(sb, "poc") != short

    code, drawn = await asyncio.to_thread(_converse, argv, cli_env, b"y\n")
    assert code == 0, drawn
    assert "\x1b[9F\x1b[J" in drawn  # the 9-line block (header + 8 steps) was redrawn in place
    assert "\x1b[32m✓\x1b[0m" in drawn  # a terminal gets colour: done steps in green
    last = re.sub(r"\x1b\[\d+m", "", drawn.rsplit("\x1b[9F\x1b[J", 1)[1]).replace("\r", "").splitlines()
    assert re.match(rf"deploy {short} → poc \(d-\w+\)  \[█+\] 8/8  \d+:\d\d$", last[0]), last[0]
    marks = [line.split()[:2] for line in last[1:9]]
    assert [name for _, name in marks] == list(EXECUTE)
    assert {mark for mark, _ in marks} <= {"✓", "\u2013"}  # done, or skipped (no migration to run)
    assert re.search(rf"deploy d-\w+ \({short} → poc\) succeeded", last[-1])
    assert _live_tag(sb, "poc") == short


async def test_an_unexpected_exception_is_one_line_and_the_traceback_goes_to_the_log(
    sb: Sandbox, cli, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    async def broken(self: DeployService) -> None:
        raise RuntimeError("boom with password=hunter2")

    monkeypatch.setattr(DeployService, "status", broken)
    run = await cli("status")
    assert run.code == 1
    log_file = Path(cli_env["WORK_DIR"]) / "funnelcake-cli.log"
    assert run.err == f"error: internal error: RuntimeError (see {log_file})\n"
    assert "hunter2" not in run.err
    assert "Traceback" in log_file.read_text()


# ---- the reporter alone ----------------------------------------------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, *, tty: bool, encoding: str = "utf-8") -> None:
        super().__init__()
        self._tty = tty
        self._encoding = encoding

    def isatty(self) -> bool:
        return self._tty

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding


def _ev(step: str, kind: EventKind, message: str = "", **data: object) -> StepEvent:
    return StepEvent("d-test", step, kind, message, data, elapsed=1.5)


async def test_reporter_on_a_tty_redraws_in_place_with_bar_and_clock() -> None:
    now = [100.0]
    stream = _Stream(tty=True)
    reporter = TerminalReporter(
        ["resolve", "images"],
        title="deploy abc → poc",
        stream=stream,
        clock=lambda: now[0],
        width=80,
        colour=False,
    )
    async with reporter:
        await reporter.emit(_ev("resolve", EventKind.STARTED))
        now[0] += 65
        await reporter.emit(_ev("resolve", EventKind.DONE))
        await reporter.emit(
            _ev("images", EventKind.PROGRESS, "poc/funnelcake-api:abc promoted from production")
        )
    frames = stream.getvalue().split("\x1b[3F\x1b[J")
    assert len(frames) >= 4  # the first draw, then each event and the close redraw the 3 lines in place
    last = frames[-1].splitlines()
    assert last[0] == "deploy abc → poc  [████████████░░░░░░░░░░░░] 1/2  1:05"
    assert last[1] == "  ✓ resolve    1.5s"
    assert last[2].startswith("  … images           poc/funnelcake-api:abc promoted")


async def test_reporter_without_a_tty_prints_plain_lines_and_keeps_the_failure() -> None:
    stream = _Stream(tty=False)
    reporter = TerminalReporter(["resolve", "images"], stream=stream)
    async with reporter:
        await reporter.emit(_ev("resolve", EventKind.STARTED))
        await reporter.emit(_ev("resolve", EventKind.FAILED, "'zzz' is not a commit"))
        await reporter.emit(_ev("deploy", EventKind.FAILED, "resolve: 'zzz'…", hint="check the hash"))
    lines = stream.getvalue().splitlines()
    assert "\x1b" not in stream.getvalue()
    assert len(lines) == 2  # one line per step event; the closing summary is not a step
    assert re.match(r"\[ *[0-9.]+s\] 0/2 … resolve started$", lines[0])
    assert re.match(r"\[ *[0-9.]+s\] 1/2 ✗ resolve failed in 1.5s: 'zzz' is not a commit$", lines[1])
    assert reporter.failure is not None
    assert (reporter.failure.step, reporter.failure.hint) == ("resolve", "check the hash")


async def test_reporter_shows_a_refusal_before_any_step_as_that_step() -> None:
    stream = _Stream(tty=False)
    reporter = TerminalReporter(["resolve", "images"], stream=stream)
    await reporter.emit(
        _ev("deploy", EventKind.FAILED, "poc is locked by bob", failed_step="lock", hint="ask bob")
    )
    assert re.match(r"\[ *[0-9.]+s\] 1/3 ✗ lock failed in 1.5s: poc is locked by bob$", stream.getvalue())
    assert [s.name for s in reporter.steps] == ["lock", "resolve", "images"]
    assert reporter.failure is not None
    assert (reporter.failure.step, reporter.failure.hint) == ("lock", "ask bob")


async def test_reporter_shows_a_failed_rollouts_diagnosis_with_its_details_under_the_step() -> None:
    stream = _Stream(tty=False)
    reporter = TerminalReporter(["rollout"], stream=stream)
    diagnosed = Diagnosed(
        "poc",
        "api crashes at start with `exec format error`",
        "exec /app/api: exec format error",
        "Rebuild the image for linux/amd64 and deploy again.",
        details={"container": "api", "exit code": "1", "restarts": "4", "image": "r/" + "x" * 300},
    )
    failed = StepEvent("d-test", "rollout", EventKind.FAILED, "pods crash", payload=diagnosed, elapsed=2.0)
    await reporter.emit(failed)
    lines = stream.getvalue().splitlines()
    assert re.match(r"\[ *[0-9.]+s\] 1/1 ✗ rollout failed in 2.0s: pods crash$", lines[0])
    assert lines[1:4] == [
        "    diagnosis (poc): api crashes at start with `exec format error`",
        "    fix: Rebuild the image for linux/amd64 and deploy again.",
        "    container: api",
    ]
    assert lines[4:6] == ["    exit code: 1", "    restarts: 4"]
    assert lines[6].startswith("    image: r/xxx") and lines[6].endswith("…") and len(lines[6]) < 130
    # the ledger's copy of the event holds the same facts under the keys it always had
    assert failed.data["diagnosis"]["cause"] == diagnosed.cause
    assert failed.data["diagnosis"]["details"]["restarts"] == "4"


async def test_reporter_falls_back_to_ascii_when_the_terminal_cannot_show_symbols() -> None:
    stream = _Stream(tty=False, encoding="ascii")
    reporter = TerminalReporter(["resolve"], stream=stream)
    await reporter.emit(_ev("resolve", EventKind.DONE))
    assert stream.getvalue().encode("ascii")
    assert "+ resolve done" in stream.getvalue()


# ---- scripting conventions: --version, --json, --exit-code, config-check FILE, completion -------------------


async def _run_process(env: dict[str, str], *argv: str) -> Run:
    proc = await _subprocess(env, *argv)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    run = Run(proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode())
    assert "Traceback" not in run.out + run.err
    return run


RECORD_FIELDS = {
    "id", "kind", "envs", "ref", "sha", "short", "state", "requester", "approver", "origin", "message",
    "last_step", "tags", "previous_tags", "created_at", "finished_at",
}  # fmt: skip


async def test_version_and_completion_scripts(cli_env: dict[str, str]) -> None:
    version = await _run_process(cli_env, "--version")
    assert version.code == 0
    assert re.fullmatch(r"funnelcake \d+\.\d+\.\d+\S*\n", version.out), version.out

    bash = await _run_process(cli_env, "completion", "bash")
    assert bash.code == 0
    script = REPO_ROOT / "completion.bash.tmp"

    def complete(*words: str) -> list[str]:
        # what bash offers after `funnelcake <words>` + TAB, with the script sourced as a user would
        quoted = " ".join(f"'{w}'" for w in ("funnelcake", *words))
        code = (
            f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
            f'COMP_LINE="${{COMP_WORDS[*]}}"; COMP_POINT=${{#COMP_LINE}}; '
            '_shtab_funnelcake funnelcake "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"; '
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        done = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.split()

    script.write_text(bash.out)
    try:
        assert complete("st") == ["status"]
        assert complete("status", "--e") == ["--exit-code"]
        assert "--json" in complete("history", "--")
        assert complete("--v") == ["--version"]
    finally:
        script.unlink()
    zsh = await _run_process(cli_env, "completion", "zsh")
    assert zsh.code == 0
    assert zsh.out.startswith("#compdef funnelcake")
    tcsh = await _run_process(cli_env, "completion", "tcsh")
    assert tcsh.code == 0
    assert "complete funnelcake" in tcsh.out
    assert (await _run_process(cli_env, "completion", "cmd.exe")).code == 2


async def test_config_check_file_lists_every_problem_with_its_path(sb: Sandbox, tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}  # nothing else: FILE is all config-check needs
    good = await _run_process(env, "config-check", str(sb.config_path))
    assert good.code == 0, good.err
    assert f"{sb.config_path}: valid, 3 environments" in good.out
    assert re.search(r"^poc: .* · migrations ", good.out, re.M)

    data = yaml.safe_load(sb.config_path.read_text())
    del data["repos"]["gitops"]
    data["environments"][2]["registry"] = 42
    del data["environments"][1]["kube_context"]
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(data))
    bad = await _run_process(env, "config-check", str(bad_path))
    assert bad.code == 2
    assert bad.out == ""
    assert "3 problems" in bad.err
    for path in ("repos.gitops", "environments[poc].registry", "environments[staging].kube_context"):
        assert f"  - {path}: " in bad.err, bad.err

    missing = await _run_process(env, "config-check", str(tmp_path / "nope.yaml"))
    assert missing.code == 2
    assert "cannot read the file" in missing.err


async def test_json_status_history_plan_and_status_exit_code(sb: Sandbox, cli_env: dict[str, str]) -> None:
    status = await _run_process(cli_env, "status", "--json")
    report = json.loads(status.out)  # the whole of stdout is one JSON document
    assert {"envs", "findings", "has_findings"} <= set(report)
    assert {"env", "rows", "error", "lock", "checks", "behind"} <= set(report["envs"][0])
    assert {"env", "severity", "text", "action"} <= set(report["findings"][0]) if report["findings"] else True
    findings = any(f["severity"] in ("warn", "error") for f in report["findings"])
    assert report["has_findings"] is findings
    plain = await _run_process(cli_env, "status", "--exit-code")
    assert plain.code == (1 if findings else 0), plain.out
    assert "\x1b[" not in plain.out  # a pipe: no colour

    # a finding for sure: a locked env; --exit-code makes a script notice it
    assert (await _run_process(cli_env, "lock", "poc", "load", "test")).code == 0
    try:
        locked = await _run_process(cli_env, "status", "--exit-code", "--json")
        assert locked.code == 1
        doc = json.loads(locked.out)
        assert doc["has_findings"] is True
        assert any(f["env"] == "poc" and f["severity"] == "warn" for f in doc["findings"])
        forced = await _run_process({**cli_env, "FORCE_COLOR": "1"}, "status")
        assert "\x1b[33mWARN \x1b[0m" in forced.out  # FORCE_COLOR: colour even in a pipe
        no_colour = await _run_process({**cli_env, "FORCE_COLOR": "1", "NO_COLOR": "1"}, "status")
        assert "\x1b[" not in no_colour.out  # NO_COLOR wins
    finally:
        assert (await _run_process(cli_env, "unlock", "poc")).code == 0

    history = await _run_process(cli_env, "history", "--limit", "5", "--json")
    assert history.code == 0
    deploys = json.loads(history.out)["deploys"]
    for record in deploys:
        assert set(record) == RECORD_FIELDS

    short = _short(sb, "head")
    await _ci_built(sb, short)
    plan = await _run_process(cli_env, "plan", "poc", short, "--json")
    assert plan.code == 0, plan.err
    doc = json.loads(plan.out)
    assert doc["ok"] is True and doc["failed"] is None and doc["exit_code"] == 0
    assert doc["plan"]["commit"]["short"] == short
    assert doc["plan"]["envs"] == ["poc"]
    assert f"Plan: deploy {short}" in plan.err  # the human-readable plan went to stderr
    bad = await _run_process(cli_env, "plan", "poc", "deadbee", "--json")
    assert bad.code == 1
    failed = json.loads(bad.out)
    assert failed["ok"] is False and failed["failed"]["step"] == "resolve"


async def test_deploy_json_is_one_document_and_progress_goes_to_stderr(
    sb: Sandbox, cli_env: dict[str, str]
) -> None:
    live = _live_tag(sb, "poc")
    short = next(c for c in (_short(sb, "head"), _short(sb, "add-index")) if c != live)
    await _ci_built(sb, short)
    run = await _run_process(
        cli_env, "deploy", "poc", short, "--yes", "--allow-downgrade", "--json", "--as", "U0ALICE"
    )
    assert run.code == 0, run.err
    doc = json.loads(run.out)
    assert doc["ok"] is True and doc["exit_code"] == 0 and doc["failed"] is None
    assert set(doc["deploy"]) == RECORD_FIELDS
    assert doc["deploy"]["state"] == "succeeded"
    assert doc["deploy"]["envs"] == ["poc"]
    assert doc["deploy"]["tags"] == {"poc": short}
    assert re.search(r"\d/8 . rollout done in", run.err)  # the live steps, on stderr
    assert _live_tag(sb, "poc") == short
    history = await _run_process(cli_env, "history", "poc", "--limit", "1", "--json")
    page = json.loads(history.out)
    assert page["deploys"] == [doc["deploy"]]
    # the next page starts at this deploy when older ones remain (other tests here may have deployed poc)
    older = await _run_process(cli_env, "history", "poc", "--json")
    assert page["older_than"] == (doc["deploy"]["id"] if len(json.loads(older.out)["deploys"]) > 1 else None)


# ---- clients only when needed, one plugin run per token ----------------------------------------------------


async def test_history_needs_no_cluster_and_runs_no_credential_plugin(
    sb: Sandbox, cli_env: dict[str, str], tmp_path: Path
) -> None:
    counter = tmp_path / "plugin-runs"
    dead = write_kubeconfig(
        tmp_path / "dead-kubeconfig",
        dict.fromkeys(CONTEXTS.values(), "http://127.0.0.1:9"),  # nothing listens there
        exec_plugin=PLUGIN,
        exec_env=plugin_env("never-used", counter=counter),
    )
    env = {**cli_env, "KUBECONFIG": str(dead)}
    run = await _run_process(env, "history", "--limit", "3")
    assert run.code == 0, run.err
    # the same page as with the clusters reachable: history reads the ledger only
    assert run.out == (await _run_process(cli_env, "history", "--limit", "3")).out
    assert not counter.exists()  # no cluster client was built, no token fetched
    # the same kubeconfig with a command that needs the clusters: they are reported unreachable
    status = await _run_process(env, "status")
    assert "unreachable" in status.out
    assert counter.read_text().count("\n") == 1  # and the three contexts shared one plugin run


async def test_status_runs_the_plugin_once_for_three_clusters(
    sb: Sandbox, cli_env: dict[str, str], tmp_path: Path
) -> None:
    assert sb.clusters is not None
    counter = tmp_path / "plugin-runs"
    kubeconfig = sb.clusters.write_kubeconfig(tmp_path / "kubeconfig", counter=counter)
    run = await _run_process({**cli_env, "KUBECONFIG": str(kubeconfig)}, "status", "--json")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert [e["error"] for e in report["envs"]] == [None, None, None]  # every cluster answered
    assert all(e["rows"] for e in report["envs"])
    assert counter.read_text().count("\n") == 1  # one token, unexpired, for production, staging and poc


async def test_colour_follows_no_color_force_color_and_the_tty() -> None:
    tty, pipe = _Stream(tty=True), _Stream(tty=False)
    assert colour_enabled(tty, {}) is True
    assert colour_enabled(pipe, {}) is False
    assert colour_enabled(tty, {"NO_COLOR": "1"}) is False
    assert colour_enabled(tty, {"NO_COLOR": ""}) is True  # no-color.org: only a non-empty value counts
    assert colour_enabled(pipe, {"FORCE_COLOR": "1"}) is True
    assert colour_enabled(pipe, {"FORCE_COLOR": "0"}) is False
    assert colour_enabled(pipe, {"FORCE_COLOR": "1", "NO_COLOR": "1"}) is False


async def test_history_shows_a_page_and_the_command_for_the_next(
    sb: Sandbox,
    cli,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'paged.db'}"
    ledger = await Ledger.open(url)
    try:
        made = [
            (
                await ledger.create_deploy(
                    kind="deploy", envs=["poc"], ref=f"c{i:06d}", short=f"c{i:06d}", requester="U0ALICE"
                )
            ).id
            for i in range(5)
        ]
    finally:
        await ledger.close()
    monkeypatch.setenv("DATABASE_URL", url)

    listed: list[str] = []
    argv = ["history", "poc", "--limit", "2"]
    for _ in range(3):
        run = await cli(*argv)
        assert run.code == 0, run.err
        lines = run.out.strip().splitlines()
        listed += [line.split()[0] for line in lines[1:] if not line.startswith("older deploys:")]
        if not lines[-1].startswith("older deploys:"):
            break
        # the last line is the command to type for the next page
        prog, *argv = lines[-1].removeprefix("older deploys: ").split()
        assert prog == "funnelcake"
    assert listed == made[::-1]
    assert argv == ["history", "poc", "--limit", "2", "--before", made[1]]

    unknown = await cli("history", "--before", "d-nope00")
    assert unknown.code != 0
    assert "no deploy d-nope00" in unknown.err
