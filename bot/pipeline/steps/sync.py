"""sync: each env's OWN Argo CD — hard refresh, wait until consumed, sync to the pushed revision (F2)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Step, StepProgress
from bot.pipeline.vocab import StepName
from bot.settings import DEFAULT_STEP_BUDGETS


class Sync(Step[DeployContext]):
    name = StepName.SYNC
    timeout = DEFAULT_STEP_BUDGETS.sync

    async def run(self, ctx: DeployContext, progress: StepProgress) -> Mapping[str, Any]:
        revision = ctx.bump.commit if ctx.bump and ctx.bump.commit else await ctx.deps.gitops.head()

        async def one(env_name: str) -> None:
            env = ctx.deps.config.env(env_name)
            apps = list(env.argocd.applications.values())
            await ctx.guard(f"the Argo CD sync of {env.name}")
            results = await ctx.deps.argocd(env).sync_all(apps, revision, username=ctx.requester)
            ctx.synced[env.name] = results
            await progress(
                f"{env.name}: " + ", ".join(f"{r.app} {r.phase} @ {r.revision[:7]}" for r in results),
                {"env": env.name},
            )

        async with asyncio.TaskGroup() as tg:
            for env in ctx.envs:
                tg.create_task(one(env.name), name=f"{ctx.deploy_id}-sync-{env.name}")
        return {
            "revision": revision,
            "apps": {
                e: [(r.app, r.phase, r.health, r.sync_status) for r in rs] for e, rs in ctx.synced.items()
            },
        }
