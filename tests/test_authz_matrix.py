"""The authorization matrix, cell by cell, through the running app: signed Slack commands, button clicks
and the CLI's real `main()`. The expected cells are the README's table, so the two cannot drift apart.

Every env is locked by an operator nobody else is, and every commit asked for is unknown: a request the
authority allows then stops at the lock or the ref (a refusal of another kind), so no cell deploys
anything and the whole matrix runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import pytest
import pytest_asyncio
import yaml

from bot.cli import EXIT_REFUSED, main
from bot.ledger.models import DeployKind, DeployState
from bot.settings import parse_config
from handlers import buttons
from tests.testbed.botrun import RunningBot
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import FakeSlack, block_actions_payload, signed_headers

pytestmark = pytest.mark.asyncio(loop_scope="module")

README = Path(__file__).resolve().parent.parent / "README.md"
CHANNEL = "C0DEPLOYS"
UNKNOWN = "0000000"  # no such commit: an allowed deploy stops at the ref (or the lock before it)
HOLDER = "U0OPS"  # holds every env's lock; none of the principals below
ENVSETS = {"production": "production", "staging": "staging", "poc": "poc", "multi": "production,staging"}
SLACK = {
    "requester": "U0BOB",
    "deployer": "U0ALICE",
    "approver": "U0CAROL",
    "admin": "U0EVE",
    "stranger": "U0DAVE",
}
CLI = {"cli-mapped": "U0ALICE", "cli-unmapped": None}
ENV_FREE = ("status", "history")  # one cell per principal
SINGLE_ENV = ("migrate", "rollback", "lock", "unlock", "catchup", "rebuild", "force")
BUTTONS = ("approve", "deny", "cancel", "catchup", "rebuild")
ON_A_DEPLOY = ("approve", "deny", "cancel")


def _matrix() -> dict[tuple[str, str], set[str] | None]:
    """README's table: (action, principal) -> the env sets where it is allowed; None for n/a."""
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- authz-matrix:start -->")[1].split("<!-- authz-matrix:end -->")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.strip().splitlines()]
    header, body = rows[0], rows[2:]
    out: dict[tuple[str, str], set[str] | None] = {}
    for row in body:
        for principal, cell in zip(header[1:], row[1:], strict=True):
            allowed: set[str] | None
            if cell == "n/a":
                allowed = None
            elif cell == "✓":
                allowed = set(ENVSETS)
            elif cell == "✗":
                allowed = set()
            else:
                allowed = {c.strip() for c in cell.split(",")}
                assert allowed <= set(ENVSETS), cell
            out[(row[0], principal)] = allowed
    return out


MATRIX = _matrix()


def _cells() -> list[tuple[str, str, str]]:
    cells = []
    for (action, principal), allowed in MATRIX.items():
        if allowed is None:
            continue
        for envset in ("-",) if action in ENV_FREE else ENVSETS:
            if envset == "multi" and action in SINGLE_ENV:
                continue  # the grammar takes one env for these
            cells.append((action, principal, envset))
    return cells


def _me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


@dataclass
class World:
    sandbox: Sandbox
    slack: FakeSlack
    bot: RunningBot
    env: dict[str, str]
    configs: dict[str, Path]

    @property
    def ledger(self):  # type: ignore[no-untyped-def]
        assert self.bot.service is not None
        return self.bot.service.deps.ledger

    async def relock(self) -> None:
        held = {lock.env for lock in await self.ledger.locks()}
        for env in ENVSETS.values():
            for e in env.split(","):
                if e not in held:
                    await self.ledger.lock(e, HOLDER, "matrix test")
                    held.add(e)

    async def deploy_record(self, envs: str) -> str:
        """A request by the requester waiting for approval; its approval is bound to a plan that never was,
        so an allowed approval is voided rather than run."""
        record = await self.ledger.create_deploy(
            kind=DeployKind.DEPLOY,
            envs=envs.split(","),
            ref=UNKNOWN,
            requester=SLACK["requester"],
            state=DeployState.AWAITING_APPROVAL,
        )
        await self.ledger.request_approval(
            record.id,
            binding="matrix",
            requester=SLACK["requester"],
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
        return record.id

    async def post(self, body: bytes) -> None:
        status, text = await self.bot.post(body, signed_headers(body, self.slack.signing_secret))
        assert status == 200, (status, text)

    async def slack_attempt(self, action: str, user: str, envs: str) -> list[str]:
        """What the user was told (through the response_url) after the request, once everything settled."""
        url = self.slack.response_url(channel=CHANNEL, user_id=user)
        env = envs.split(",", maxsplit=1)[0]
        if action in BUTTONS:
            if action in ON_A_DEPLOY:
                action_id, value = action, await self.deploy_record(envs)
            else:
                assert self.bot.service is not None
                ran = await self.bot.service.current_tag(env)
                action_id = f"catchup-{env}" if action == "catchup" else "rebuild"
                value = buttons.command(f"deploy {env} {UNKNOWN}", ran=ran)
            payload = block_actions_payload(
                action_id=action_id, value=value, user_id=user, channel_id=CHANNEL, response_url=url
            )
            await self.post(urlencode({"payload": json.dumps(payload)}).encode())
        else:
            text = {
                "status": "status",
                "history": "history",
                "plan": f"plan {envs} {UNKNOWN}",
                "deploy": f"deploy {envs} {UNKNOWN}",
                "migrate": f"migrate {env} {UNKNOWN}",
                "rollback": f"rollback {env}",
                "lock": f"lock {env} matrix",
                "unlock": f"unlock {env}",
                "force": f"migrate {env} force 1",
            }[action]
            payload = self.slack.slash_payload(text, user_id=user, channel_id=CHANNEL)
            payload["response_url"] = url
            await self.post(urlencode(payload).encode())
        await self.bot.settle()
        return [str(r.body.get("text", "")) for r in self.slack.responses_to(url)]

    async def cli_attempt(self, action: str, principal: str, envs: str) -> tuple[int, str]:
        env = envs.split(",", maxsplit=1)[0]
        argv = {
            "status": ["status"],
            "history": ["history"],
            "plan": ["plan", envs, UNKNOWN],
            "deploy": ["deploy", envs, UNKNOWN, "--yes"],
            "migrate": ["migrate", env, UNKNOWN],
            "rollback": ["rollback", env],
            "lock": ["lock", env, "matrix"],
            "unlock": ["unlock", env],
        }.get(action) or [action, await self.deploy_record(envs)]
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {**self.env, "FUNNELCAKE_CONFIG": str(self.configs[principal])}.items():
                mp.setenv(key, value)
            code = await asyncio.to_thread(main, argv)
        return code, " ".join(argv)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    root = tmp_path_factory.mktemp("matrix")
    sandbox = Sandbox(root=root / "sandbox")
    await sandbox.start()
    slack = FakeSlack()
    await slack.start()
    bot: RunningBot | None = None
    try:
        data = yaml.safe_load(sandbox.config_path.read_text())
        for env in data["environments"]:
            env["admins"] = ["U0EVE"]
            if env["name"] == "production":
                env["deployers"] = ["U0ALICE", "U0BOB"]
                env["approvers"] = ["U0CAROL"]
        configs = {}
        for principal, operators in (
            ("cli-mapped", [{"os_user": _me(), "slack_user": CLI["cli-mapped"]}]),
            ("cli-unmapped", [{"os_user": f"not-{_me()}", "slack_user": "U0ALICE"}]),
        ):
            path = root / f"{principal}.yaml"
            path.write_text(yaml.safe_dump({**data, "operators": operators}, sort_keys=False))
            configs[principal] = path
        sandbox.config = parse_config(configs["cli-mapped"].read_text())
        bot = RunningBot(sandbox, slack)
        await bot.start()
        s = sandbox.settings()
        env = {"KUBECONFIG": str(s.kubeconfig), "DATABASE_URL": s.database_url, "WORK_DIR": str(s.work_dir)}
        world = World(sandbox, slack, bot, env, configs)
        await world.relock()
        yield world
    finally:
        if bot is not None:
            await bot.stop()
        await slack.stop()
        await sandbox.stop()


@pytest.mark.parametrize(("action", "principal", "envset"), _cells())
async def test_cell(world: World, action: str, principal: str, envset: str) -> None:
    allowed = MATRIX[(action, principal)]
    assert allowed is not None
    expect_allowed = bool(allowed) if envset == "-" else envset in allowed
    envs = ENVSETS.get(envset, "staging")
    await world.relock()
    records_before = len(await world.ledger.history(None, 500))
    if principal in CLI:
        code, argv = await world.cli_attempt(action, principal, envs)
        refused = code == EXIT_REFUSED
        assert refused != expect_allowed, f"`funnelcake {argv}` as {principal} exited {code}"
    else:
        posts_before = len(world.slack.calls_to("chat.postMessage"))
        told = await world.slack_attempt(action, SLACK[principal], envs)
        refused = any(t.startswith("🚫 Not allowed") for t in told)
        assert refused != expect_allowed, (action, principal, envset, told)
        if refused:
            assert len(told) == 1 and re.search(r"[a-z]", told[0][15:]), told  # one private reason
        else:
            # something visibly happened: an answer to the asker, or a channel post (status, lock)
            assert told or len(world.slack.calls_to("chat.postMessage")) > posts_before, told
    if refused:
        # a refusal leaves no trace: the only records are the ones the cell itself set up
        extra = 1 if action in ON_A_DEPLOY else 0
        assert len(await world.ledger.history(None, 500)) == records_before + extra
