"""A real deploy on the test bed, as GKE's logging agent reads the bot's output: JSON lines in Cloud Logging's
field names, one line marking the deploy's start and one its end (outcome, duration), and the deploy's id,
env and step as the entry's labels."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bot.ledger import DeployState, Ledger
from bot.logs import LABELS_KEY
from tests.testbed.botproc import BotProcess
from tests.testbed.sandbox import Sandbox
from tests.testbed.scenario import launch, push_head, wait_finished
from tests.testbed.slack import FakeSlack


async def test_a_deploy_logs_its_start_and_its_end_with_outcome_duration_and_labels(
    sandbox: Sandbox, slack_sandbox: FakeSlack, bots: list[BotProcess]
) -> None:
    short = await push_head(sandbox)
    bot = await launch(bots, sandbox, slack_sandbox, "logs", mode="http", extra_env={"LOG_FORMAT": "json"})
    status, _ = await bot.deliver(*slack_sandbox.signed_slash_command(f"deploy poc {short}"))
    assert status == 200
    ledger = await Ledger.open(bot.database_url)
    try:
        async with asyncio.timeout(60):
            while not (records := await ledger.history("poc", 1)):
                await asyncio.sleep(0.05)
        record = await wait_finished(ledger, records[0].id, bot)
    finally:
        await ledger.close()
    assert record.state is DeployState.SUCCEEDED, record.message
    assert await bot.stop() == 0
    lines: list[dict[str, Any]] = [json.loads(line) for line in bot.tail(10**7).splitlines() if line.strip()]
    assert all({"severity", "message", "time"} <= set(r) for r in lines)
    assert not [r for r in lines if "level" in r or "msg" in r]

    mine = [r for r in lines if r.get(LABELS_KEY, {}).get("deploy_id") == record.id]
    started = [r for r in mine if r["message"].startswith("deploy started")]
    finished = [r for r in mine if r["message"].startswith("deploy finished")]
    assert len(started) == 1 and len(finished) == 1, [r["message"] for r in mine]
    (start,), (end,) = started, finished
    assert start["message"] == f"deploy started: deploy of {short} to poc by {record.requester}"
    assert start["severity"] == "INFO"
    assert start[LABELS_KEY] == {"deploy_id": record.id, "env": "poc"}
    assert end["severity"] == "INFO"
    assert end["outcome"] == "succeeded"
    assert end["message"] == f"deploy finished: succeeded in {end['duration_seconds']:g} s"
    assert end["duration_seconds"] > 0
    assert end[LABELS_KEY] == {"deploy_id": record.id, "env": "poc"}
    assert lines.index(start) < lines.index(end)
    # a line written inside a step says which step it is
    pushed = next(r for r in mine if r["message"].startswith("pushed "))
    assert pushed[LABELS_KEY] == {"deploy_id": record.id, "env": "poc", "step": "gitops"}
