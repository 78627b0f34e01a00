"""Messages link where a reader looks next: the commit and the compare view on the app repo's web page,
the env's Argo CD applications, and the GitOps commit the deploy made — when the environments file names
those web pages; without them the same messages carry plain hashes."""

from __future__ import annotations

import asyncio
from typing import Any

import yaml

from bot.ledger import DeployState, Ledger
from tests.testbed.botproc import BotProcess
from tests.testbed.sandbox import Sandbox
from tests.testbed.scenario import launch, push_head, wait_finished
from tests.testbed.slack import DEFAULT_CHANNEL, FakeSlack

APP_WEB = "https://github.example/divinevideo/funnelcake"
GITOPS_WEB = "https://github.example/divinevideo/divine-iac-coreconfig"
ARGO = "https://argocd.poc.example"


def with_web_pages(sandbox: Sandbox) -> None:
    data: dict[str, Any] = yaml.safe_load(sandbox.config_path.read_text())
    data["repos"]["app"]["web_url"] = APP_WEB
    data["repos"]["gitops"]["web_url"] = GITOPS_WEB
    for env in data["environments"]:
        if env["name"] == "poc":
            env["argocd"]["url"] = ARGO
    sandbox.reconfigure(repos=data["repos"], environments=data["environments"])


async def test_a_deploy_thread_links_the_commit_the_compare_view_argo_cd_and_the_gitops_commit(
    sandbox: Sandbox, slack_sandbox: FakeSlack, bots: list[BotProcess]
) -> None:
    slack = slack_sandbox
    assert sandbox.git is not None
    with_web_pages(sandbox)
    short = await push_head(sandbox)
    bot = await launch(bots, sandbox, slack, "solo", mode="http")
    status, _ = await bot.deliver(*slack.signed_slash_command(f"deploy poc {short}"))
    assert status == 200
    ledger = await Ledger.open(bot.database_url)
    try:

        async def newest() -> str:
            while not (records := await ledger.history("poc", 1)):
                await asyncio.sleep(0.05)
            return records[0].id

        record = await wait_finished(ledger, await newest(), bot)
    finally:
        await ledger.close()
    assert record.state is DeployState.SUCCEEDED, record.message
    assert record.sha and record.thread_ts
    root = slack.message(DEFAULT_CHANNEL, record.thread_ts).shown
    assert f"*Commit* <{APP_WEB}/commit/{record.sha}|{short}>" in root, root
    previous = record.previous_tags["poc"]
    assert f"poc: <{APP_WEB}/compare/{previous}...{short}|{previous} → {short}>" in root, root
    assert f"<{ARGO}/applications/argocd/funnelcake-api|Argo CD poc/api>" in root, root
    assert f"<{ARGO}/applications/argocd/funnelcake-relay|Argo CD poc/relay>" in root, root
    async with asyncio.timeout(30):  # the thread's writer batches about once a second
        while "Done" not in (final := slack.thread(DEFAULT_CHANNEL, record.thread_ts)[-1].text):
            await asyncio.sleep(0.1)
    assert f"Argo CD revision <{GITOPS_WEB}/commit/" in final, final
