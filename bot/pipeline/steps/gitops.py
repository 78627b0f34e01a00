"""gitops: bump newTag in each env's overlays in ONE commit, push with bounded retry (F1, F6).

Invariant F1: this step re-checks every image in its target registry immediately before touching git,
so a tag deleted after the images step (or a skipped images step) can never reach an overlay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Progress, Step
from bot.pipeline.steps.images import verify_images


class GitOps(Step[DeployContext]):
    name = "gitops"
    timeout = 120.0

    async def run(self, ctx: DeployContext, progress: Progress) -> Mapping[str, Any]:
        plan = ctx.require_plan()
        await verify_images(ctx)
        await ctx.guard("the GitOps push")
        result = await ctx.deps.gitops.bump(
            ctx.envs,
            plan.commit.short,
            requester=ctx.requester,
            deploy_id=ctx.deploy_id,
            approver=ctx.approver,
            override_reason=plan.override_reason if plan.overridden else None,
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
