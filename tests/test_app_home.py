"""The App Home tab, through a real bot process over Socket Mode: opening it publishes a board of the envs
with the threads' buttons, and the board is redrawn for whoever looked when a deploy ends."""

from __future__ import annotations

from tests.testbed.botproc import BotProcess
from tests.testbed.sandbox import Sandbox
from tests.testbed.scenario import launch, push_head, until_board
from tests.testbed.slack import FakeSlack


async def test_the_home_tab_shows_every_env_and_is_redrawn_when_a_deploy_ends(
    sandbox: Sandbox, slack_sandbox: FakeSlack, bots: list[BotProcess]
) -> None:
    slack = slack_sandbox
    assert sandbox.config is not None
    bot = await launch(bots, sandbox, slack, "solo")
    await slack.send_event({"type": "app_home_opened", "user": "U0DAVE", "tab": "home", "channel": "D0DAVE"})
    home = await until_board(slack, "U0DAVE", "*poc*", bot)
    for env in ("production", "staging", "poc"):
        assert f"*{env}*" in home.shown
    rollbacks = [b for b in home.buttons() if b["action_id"].startswith("rollback-")]
    assert [b["action_id"] for b in rollbacks] == ["rollback-production", "rollback-staging", "rollback-poc"]
    assert all("confirm" in b for b in rollbacks)  # danger buttons ask first, here too

    short = await push_head(sandbox)
    await slack.send_slash(f"deploy poc {short}", user_id="U0ALICE")
    redrawn = await until_board(slack, "U0DAVE", f"deploy `{short}` — succeeded", bot)
    assert f"api `{short}`" in redrawn.shown
    assert "U0ALICE" not in slack.home_views  # only whoever opened the tab gets a board
