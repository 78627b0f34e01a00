"""Verify and status speak Nostr, against a real relay (the `nostr-relay` package) per env in the sandbox.

Each test drives the real deploy service (bot.wiring.build_service) against the full sandbox: the relay's
NIP-11 version and REQ→EOSE are checked after a deploy, and a relay that refuses websockets, one that
answers NOTICE and never EOSE, one still showing the old build, and an API whose /health fails each fail
verify with a message naming the check and what the far end said.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import yaml

from bot.drift import build_report
from bot.ledger.models import DeployKind, DeployRecord, DeployState
from bot.pipeline.events import DeploySummary
from bot.pipeline.vocab import EventKind
from bot.service import DeployService
from bot.settings import parse_config
from bot.wiring import build_service
from handlers.blocks import status_blocks, summary_text
from tests.testbed.events import Events
from tests.testbed.sandbox import Sandbox

IMAGES = ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate")
ALICE = "U0ALICE"


async def deploy_head(sandbox: Sandbox, svc: DeployService, env: str = "poc") -> tuple[str, DeployRecord]:
    """What CI and a person do: the head commit's images land in production's registry, then a deploy."""
    assert sandbox.git is not None
    short = sandbox.git.app.commits["head"][:7]
    await asyncio.gather(
        *(sandbox.registries.push("production", i, short, "multi", seed=f"{i}:{short}") for i in IMAGES)
    )
    started = await svc.start(DeployKind.DEPLOY, [env], short, ALICE)
    return short, await svc.wait(started.record.id)


async def nip11(url: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Accept": "application/nostr+json"}) as resp,
    ):
        doc: dict[str, Any] = json.loads(await resp.text())
        return doc


async def stored_events(ws_url: str) -> list[Any]:
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url) as ws:
        await ws.send_str(json.dumps(["REQ", "test-read", {"limit": 100}]))
        found = []
        async with asyncio.timeout(10):
            while (msg := json.loads(await ws.receive_str()))[0] != "EOSE":
                found.append(msg)
        return found


async def test_a_deploy_verifies_the_relays_nip11_version_and_req_eose(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    relay = sandbox.relays["poc"]
    before = (await nip11(relay.http_url))["version"]

    short, record = await deploy_head(sandbox, svc)

    assert record.state is DeployState.SUCCEEDED, record.message
    assert before != short
    # the real relay now reports the deployed commit, as funnelcake's relay reports its build
    doc = await nip11(relay.http_url)
    assert doc["version"] == short
    assert "nostr_relay" in doc["software"]
    # verify checked it, and REQ → EOSE, and the API's /health; the thread line says so with the latency
    (done,) = events.of(record.id, "verify", EventKind.DONE)
    checks = {c["check"]: c for c in done.data["endpoints"]["poc"]}
    assert checks["relay NIP-11"]["status"] == "ok"
    assert checks["relay NIP-11"]["version"] == short
    assert checks["relay REQ→EOSE"]["status"] == "ok"
    assert checks["relay REQ→EOSE"]["latency_ms"] > 0
    assert checks["api /health"]["status"] == "ok"
    line = done.data["endpoint_lines"]["poc"]
    assert f"relay NIP-11 version {short}" in line
    assert "relay REQ→EOSE" in line and " ms" in line
    # and the closing summary a person reads carries the same line
    (summary,) = events.of(record.id, "deploy", EventKind.DONE)
    assert isinstance(summary.payload, DeploySummary)
    text = summary_text(summary.payload, True, "")
    assert f"📡 poc: relay NIP-11 version {short}" in text
    # the check is read-only: the relay holds no event at all after the deploy
    assert await stored_events(relay.ws_url) == []


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("ws-refused", "relay REQ→EOSE: {ws} refused the websocket handshake (HTTP 403"),
        ("notice", "relay REQ→EOSE: the relay answered NOTICE “rate-limited” instead of EOSE"),
        ("old-version", "relay NIP-11: funnelcake poc (test bed) reports version {old}, expected {short}"),
        ("api-down", "api /health: {api}health answered 503: no healthy upstream"),
    ],
)
async def test_a_relay_or_api_that_does_not_answer_right_fails_verify_in_its_own_words(
    sandbox: Sandbox, service: tuple[DeployService, Events], fault: str, said: str
) -> None:
    svc, events = service
    relay = sandbox.relays["poc"]
    old = relay.version
    if fault in ("ws-refused", "notice"):
        await relay.set_fault(fault)  # type: ignore[arg-type]
    elif fault == "old-version":
        relay.pin_version()  # the new pods never take the relay's traffic
    else:
        sandbox.apis["poc"].down = True

    short, record = await deploy_head(sandbox, svc)

    assert record.state is DeployState.FAILED
    assert record.message is not None
    expected = said.format(ws=relay.ws_url, old=old, short=short, api=sandbox.apis["poc"].url)
    assert record.message.startswith("verify: verification failed"), record.message
    assert expected in record.message, record.message
    (failed,) = events.of(record.id, "verify", EventKind.FAILED)
    assert "the service does not answer as it should" in failed.data["hint"]
    # the other checks still ran and passed: only the broken one is blamed
    statuses = {c["check"]: c["status"] for c in failed.data["endpoints"]["poc"]}
    assert list(statuses.values()).count("failed") == 1, statuses
    # the Slack summary shows the failure with the relay's words and the hint
    (summary,) = events.of(record.id, "deploy", EventKind.FAILED)
    assert isinstance(summary.payload, DeploySummary)
    text = summary_text(summary.payload, False, summary.message)
    assert "*Failed*" in text and "*verify*" in text
    assert expected.split(": ", 1)[1].replace("&", "&amp;")[:40] in text


async def test_an_env_without_relay_endpoints_says_the_checks_were_skipped(sandbox: Sandbox) -> None:
    # poc as the shipped file has it for production: no relay or API endpoints
    data = yaml.safe_load(sandbox.config_path.read_text())
    for env in data["environments"]:
        if env["name"] == "poc":
            env.pop("endpoints")
    config = parse_config(yaml.safe_dump(data), "funnelcake.yaml")
    events = Events()
    async with build_service(sandbox.settings(), config, reporters=lambda record: [events]) as svc:
        _short, record = await deploy_head(sandbox, svc)
        report = await build_report(svc.deps)

    assert record.state is DeployState.SUCCEEDED, record.message
    (done,) = events.of(record.id, "verify", EventKind.DONE)
    assert done.data["endpoint_lines"]["poc"] == (
        "relay and API checks skipped: no endpoints configured for this environment"
    )
    progress = [e.message for e in events.of(record.id, "verify", EventKind.PROGRESS)]
    assert "poc: relay REQ→EOSE skipped: no endpoints.relay_ws configured" in progress
    assert "poc: api /health skipped: no endpoints.api configured" in progress
    # status says the same, and a skip is not a finding
    by_env = {e.env: e for e in report.envs}
    assert by_env["poc"].endpoints == done.data["endpoint_lines"]["poc"]
    assert not [f for f in report.findings if f.env == "poc" and "relay" in f.text]


async def test_status_shows_each_envs_relay_row_and_flags_a_relay_showing_another_version(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, _ = service
    report = await build_report(svc.deps)
    rows = {e.env: e.endpoints for e in report.envs}
    staging_tag = sandbox.relays["staging"].version
    assert rows["staging"] is not None
    assert rows["staging"].startswith(f"relay NIP-11 version {staging_tag} · relay REQ→EOSE ")
    assert "api /health: 200 in " in rows["staging"]
    assert rows["production"] == "relay and API checks skipped: no endpoints configured for this environment"
    assert not [f for f in report.findings if "relay" in f.text and f.severity == "error"]
    blocks = str(status_blocks(report))
    assert f"📡 relay NIP-11 version {staging_tag}" in blocks

    # the staging relay now answers REQ with NOTICE: status names it as an error, in the relay's words
    await sandbox.relays["staging"].set_fault("notice")
    report = await build_report(svc.deps)
    errors = [f.text for f in report.findings if f.env == "staging" and f.severity == "error"]
    assert errors == ["relay REQ→EOSE: the relay answered NOTICE “rate-limited” instead of EOSE"], errors
