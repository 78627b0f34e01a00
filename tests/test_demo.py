"""The `make demo` tour, at test speed: every act of the story still ends the way the README tells it."""

from __future__ import annotations

import io

from tests.testbed.botrun import RunningBot
from tests.testbed.demo import tour
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import DEFAULT_CHANNEL, FakeSlack


async def test_the_demo_tour(bot: RunningBot, sandbox: Sandbox, slack_sandbox: FakeSlack) -> None:
    out = io.StringIO()
    await tour(bot, sandbox, slack_sandbox, out=out)
    text = out.getvalue()
    assert "Deploy funnelcake @" in text
    assert "Approved by @carol" in text
    assert "you cannot approve your own deploy" in text
    assert "you may not approve production deploys" in text
    assert "no linux/amd64 image (found: linux/arm64)" in text
    assert "Roll back staging to" in text
    assert sandbox.git is not None
    head = sandbox.git.app.commits["head"][:7]
    # the relay check in the deploy's thread: the real relay reports the new build and answers REQ
    assert f"📡 poc: relay NIP-11 version {head} · relay REQ→EOSE " in text
    assert "📡 production: relay and API checks skipped: no endpoints configured" in text
    # a hand-deployed build whose pods never start: the relay still serves the old one, and status says so
    assert "reports version" in text and "the relay answering there is not the new build" in text
    final_status = [m for m in slack_sandbox.messages(DEFAULT_CHANNEL) if m.text == "funnelcake status"][-1]
    assert "🔴" not in str(final_status.blocks)
    assert f"📡 relay NIP-11 version {head} · relay REQ→EOSE " in str(final_status.blocks)
    assert text.count("🎉 *Done*") >= 3  # poc, production, the rollback
