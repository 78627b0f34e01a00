"""Every plan tells the truth: per env and service it says forward, unchanged or DOWNGRADE (and what stays
applied), lists only the migrations that will run, warns about a commit that failed elsewhere, and a move
back needs the requester's explicit confirmation, recorded with the plan in the ledger.

Driven through the real deploy service against the sandbox; the text asserted is what Slack (plan_blocks)
and the CLI (render_plan) show.
"""

from __future__ import annotations

import asyncio
import json

from bot import commands
from bot.cli import render_plan
from bot.ledger.models import DeployKind, DeployState
from bot.models import Plan
from bot.pipeline.events import DeploySummary
from bot.service import DeployService
from handlers.blocks import plan_blocks, summary_text
from tests.test_failure_modes import ALICE, overlay_tag, parts, publish, set_relay_tag
from tests.test_slack_front import CHANNEL
from tests.testbed.botrun import RunningBot
from tests.testbed.gitrepos import overlay_path, push_from_second_clone
from tests.testbed.kube.jobs import MIGRATE_IMAGE
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import FakeSlack


def slack_text(plan: Plan) -> str:
    return json.dumps(plan_blocks(plan), ensure_ascii=False)


async def test_a_downgrade_is_shown_as_one_and_needs_confirmation(
    sandbox: Sandbox, svc: DeployService
) -> None:
    git, _ = parts(sandbox)
    older, current = git.app.short("api-paginate"), git.app.short("add-index")  # staging runs add-index

    plan, result = await svc.plan(["staging"], older, ALICE)
    assert plan is not None and result.failed is not None
    move = plan.env_plans["staging"].moves[0]
    assert (move.kind, [c.short for c in move.behind]) == ("downgrade", [current])
    assert move.kept_migrations == ["database/migrations/000003_add_index.up.sql"]
    text = slack_text(plan)
    assert (
        f"staging/api {current} → {older}: *downgrade*, moves back 1 commit; migrations NOT reverted "
        "(they stay applied): 000003_add_index.up.sql"
    ) in text
    assert "*Commits removed* (1): a downgrade" in text
    assert "none (same commit)" not in text
    problem = (
        f"staging/api would move back 1 commit ({current} → {older}); migrations 000003_add_index.up.sql "
        "stay applied (not reverted): confirm with --allow-downgrade"
    )
    assert problem in plan.problems
    assert problem in result.failed.message
    cli = "\n".join(render_plan(plan))
    assert f"api {current} → {older}: DOWNGRADE, moves back 1 commit" in cli

    # the deploy itself is refused without the confirmation, and nothing changes
    refused = await svc.wait((await svc.start(DeployKind.DEPLOY, ["staging"], older, ALICE)).record.id)
    assert refused.state is DeployState.FAILED
    assert "confirm with --allow-downgrade" in (refused.message or "")
    assert overlay_tag(sandbox, "staging", "api") == current

    # confirmed: it runs, and the ledger keeps the confirmation with the plan
    started = await svc.start(DeployKind.DEPLOY, ["staging"], older, ALICE, allow_downgrade=True)
    record = await svc.wait(started.record.id)
    assert record.state is DeployState.SUCCEEDED, record.message
    assert record.plan is not None and record.plan["allow_downgrade"] is True
    assert overlay_tag(sandbox, "staging", "api") == older


async def test_slack_asks_for_the_second_yes_with_a_button_drawn_for_that_state(
    bot: RunningBot, slack_sandbox: FakeSlack, sandbox: Sandbox
) -> None:
    assert bot.service is not None
    git, _ = parts(sandbox)
    older, current = git.app.short("api-paginate"), git.app.short("add-index")  # staging runs add-index
    await bot.command(f"deploy staging {older}", user="U0ALICE")
    await bot.settle()
    [refused] = await bot.service.history("staging", 1)
    assert refused.state is DeployState.FAILED and refused.thread_ts
    assert overlay_tag(sandbox, "staging", "api") == current

    root = slack_sandbox.message(CHANNEL, refused.thread_ts)
    [button] = [b for b in root.buttons() if b["action_id"] == "downgrade"]
    assert button["text"]["text"] == "Move back anyway"
    assert button["style"] == "danger"
    confirm = button["confirm"]["text"]["text"]
    assert (
        f"staging/api would move back 1 commit ({current} → {older}); migrations 000003_add_index.up.sql"
        in confirm
    )
    assert "Migrations are never reverted by a move back" in confirm
    assert "Roll back" not in [b["text"]["text"] for b in root.buttons()]  # nothing was pushed to roll back

    await bot.click(refused.thread_ts, "downgrade", user="U0BOB")
    await bot.settle()
    [done] = await bot.service.history("staging", 1)
    assert done.id != refused.id
    assert done.state is DeployState.SUCCEEDED, done.message
    assert done.requester == "U0BOB"  # who said the second yes
    assert done.plan is not None and done.plan["allow_downgrade"] is True
    assert overlay_tag(sandbox, "staging", "api") == older

    # the same button again acts on nothing: it was drawn for staging at `current`
    await bot.click(refused.thread_ts, "downgrade", user="U0BOB")
    await bot.settle()
    assert any(
        f"staging moved from `{current}` to `{older}` since this message" in t
        for t in slack_sandbox.told("U0BOB")
    )
    assert [r.id for r in await bot.service.history("staging", 1)] == [done.id]


async def test_a_rollback_across_a_migration_needs_confirmation(sandbox: Sandbox, svc: DeployService) -> None:
    git, _ = parts(sandbox)
    short, before = git.app.short("head"), git.app.short("api-paginate")
    await publish(sandbox, "poc", short)
    record = await svc.wait((await svc.start(DeployKind.DEPLOY, ["poc"], short, ALICE)).record.id)
    assert record.state is DeployState.SUCCEEDED, record.message

    refused = await svc.wait((await svc.start_rollback("poc", ALICE)).record.id)
    assert refused.state is DeployState.FAILED
    assert "migrations 000003_add_index.up.sql stay applied (not reverted)" in (refused.message or "")
    assert overlay_tag(sandbox, "poc", "api") == short

    parsed = commands.parse("rollback poc --allow-downgrade", ["production", "staging", "poc"])
    assert parsed == commands.Rollback("poc", allow_downgrade=True)
    done = await svc.wait((await svc.start_rollback("poc", ALICE, allow_downgrade=True)).record.id)
    assert done.state is DeployState.SUCCEEDED, done.message
    assert overlay_tag(sandbox, "poc", "api") == before


async def test_unchanged_services_are_shown_unchanged_and_only_up_migrations_listed(
    sandbox: Sandbox, svc: DeployService
) -> None:
    git, _ = parts(sandbox)
    short, before = git.app.short("head"), git.app.short("api-paginate")
    push_from_second_clone(
        git.gitops.url, overlay_path("relay", "poc"), set_relay_tag(short), "hand edit: relay ahead"
    )
    await publish(sandbox, "poc", short)
    plan, result = await svc.plan(["poc"], short, ALICE)
    assert result.ok, result.failed
    assert plan is not None
    text = slack_text(plan)
    assert f"poc/relay {short}: unchanged" in text
    assert f"poc/api {before} → {short}: 3 commits ahead" in text
    assert f"relay {short} → {short}" not in text
    assert plan.migrations == ["database/migrations/000003_add_index.up.sql"]
    assert ".down.sql" not in text
    assert "Commits included* (3)" in text

    # every service unchanged: said as such
    staging_tag = git.app.short("add-index")
    plan, _ = await svc.plan(["staging"], staging_tag, ALICE)
    assert plan is not None
    text = slack_text(plan)
    assert f"staging/api {staging_tag}: unchanged" in text
    assert f"staging/relay {staging_tag}: unchanged" in text
    assert "none (same commit)" in text
    assert "Migrations that will run*\\nnone" in text


async def test_a_commit_that_failed_elsewhere_carries_the_warning(
    sandbox: Sandbox, svc: DeployService
) -> None:
    git, _ = parts(sandbox)
    broken = git.app.short("broken")
    await publish(sandbox, "staging", broken, "amd64")
    failed = await svc.wait((await svc.start(DeployKind.DEPLOY, ["staging"], broken, ALICE)).record.id)
    assert failed.state is DeployState.FAILED and (failed.message or "").startswith("migrate: ")

    await publish(sandbox, "poc", broken, "amd64")
    plan, _ = await svc.plan(["poc"], broken, ALICE)
    assert plan is not None
    warning = f"{broken} failed in staging: deploy {failed.id} — {failed.message}"
    assert plan.warnings == [warning]
    text = slack_text(plan)
    assert "*Warnings*" in text and f"failed in staging: deploy {failed.id}" in text
    assert f"WARNING: {warning}" in render_plan(plan)[-1 - len(plan.problems)]


async def test_why_preflight_chose_to_build_is_in_the_failure(sandbox: Sandbox, svc: DeployService) -> None:
    git, _ = parts(sandbox)

    def drop_relay_stage(text: str) -> str:
        return text.split("FROM gcr.io/distroless/cc-debian12:nonroot AS relay", maxsplit=1)[0]

    sha = await asyncio.to_thread(
        push_from_second_clone, git.app.url, "Dockerfile", drop_relay_stage, "build: api only\n"
    )
    short = sha[:7]
    await publish(sandbox, "poc", short, "amd64", images=("funnelcake-api", MIGRATE_IMAGE))
    await publish(sandbox, "poc", short, "arm64", images=("funnelcake-relay",))  # built on a Mac

    record = await svc.wait((await svc.start(DeployKind.DEPLOY, ["poc"], short, ALICE)).record.id)
    assert record.state is DeployState.FAILED
    reason = f"poc/funnelcake-relay:{short}: poc registry has it for linux/arm64 only, so building: "
    assert (record.message or "").startswith(f"images: {reason}the build of funnelcake-relay:{short}"), (
        record.message
    )
    steps = await svc.deps.ledger.steps(record.id)
    images = next(s for s in steps if s.step == "images")
    assert images.detail is not None
    assert 'target stage "relay" could not be found' in str(images.detail)
    # what Slack's last reply shows
    text = summary_text(DeploySummary(state="failed", failed_step="images"), False, record.message or "")
    assert "linux/arm64 only, so building" in text
