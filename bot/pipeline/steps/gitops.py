"""gitops: bump newTag in each env's overlays in ONE commit, push with bounded retry (F1, F6).

Invariant F1: this step re-checks every image in its target registry immediately before touching git,
so a tag deleted after the images step (or a skipped images step) can never reach an overlay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Step, StepProgress
from bot.pipeline.steps.images import REGISTRY_RETRY, verify_images
from bot.pipeline.vocab import StepName
from bot.settings import DEFAULT_STEP_BUDGETS

log = logging.getLogger(__name__)

IDENTITY_TIMEOUT = 5.0  # a directory lookup never holds a push: past it, the trailer keeps the chat ID


class GitOps(Step[DeployContext]):
    name = StepName.GITOPS
    timeout = DEFAULT_STEP_BUDGETS.gitops
    retry = REGISTRY_RETRY

    async def run(self, ctx: DeployContext, progress: StepProgress) -> Mapping[str, Any]:
        plan = ctx.require_plan()
        # The people's names come from the chat's directory while the registry is asked again: two waits
        # on two systems, side by side.
        async with asyncio.TaskGroup() as group:
            group.create_task(verify_images(ctx), name=f"gitops-verify-{ctx.deploy_id}")
            requester = group.create_task(
                signature(ctx, ctx.requester), name=f"gitops-requester-{ctx.deploy_id}"
            )
            approver = (
                group.create_task(signature(ctx, ctx.approver), name=f"gitops-approver-{ctx.deploy_id}")
                if ctx.approver
                else None
            )
        await ctx.guard("the GitOps push")
        result = await ctx.deps.gitops.bump(
            ctx.envs,
            plan.commit.short,
            requester=requester.result(),
            deploy_id=ctx.deploy_id,
            approver=approver.result() if approver else None,
            override_reason=plan.override_reason if plan.overridden else None,
            digests={key: s.digest for key, s in ctx.verified.items() if s.digest},
        )
        ctx.bump = result
        if result.noop:
            await progress(f"overlays already at {plan.commit.short}: nothing to push", {})
        return {
            "commit": result.commit,
            "noop": result.noop,
            "attempts": result.attempts,
            "previous": {e: {s.value: t for s, t in tags.items()} for e, tags in result.previous.items()},
        }


async def signature(ctx: DeployContext, user: str) -> str:
    """How a person is named in a deploy commit: `Name <email>` when the chat's directory knows them (an
    auditor reading git needs no Slack), else their chat ID. A lookup that fails only costs the name."""
    people = ctx.deps.people
    if people is None:
        return user
    try:
        async with asyncio.timeout(IDENTITY_TIMEOUT):
            found = await people.identity(user)
    except Exception as e:  # noqa: BLE001 - any directory failure keeps the ID; the push goes on
        log.warning("could not look up %s for the commit trailers: %s", user, type(e).__name__)
        return user
    return found or user
