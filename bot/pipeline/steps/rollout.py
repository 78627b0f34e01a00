"""rollout: watch the Deployments and their new pods; fail fast with a diagnosis on pull/crash errors (F3, F10)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from bot.adapters.rollout import RolloutProgress, watch_rollouts
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Progress, Step
from bot.settings import Service


class Rollout(Step[DeployContext]):
    name = "rollout"
    timeout = 900.0

    async def run(self, ctx: DeployContext, progress: Progress) -> Mapping[str, Any]:
        give_up = ctx.deps.config.timeouts.rollout

        async def one(env_name: str) -> None:
            env = ctx.deps.config.env(env_name)

            async def report(p: RolloutProgress) -> None:
                await progress(
                    f"{env.name}/{p.deployment}: {p.ready}/{p.total} ready",
                    {"env": env.name, "deployment": p.deployment, "ready": p.ready, "total": p.total},
                )

            ctx.rollouts[env.name] = await watch_rollouts(
                ctx.deps.kube[env.kube_context],
                env.namespace,
                [s.image for s in Service],
                diagnoser=ctx.deps.diagnoser(env),
                give_up_after=give_up,
                progress=report,
            )

        async with asyncio.TaskGroup() as tg:
            for env in ctx.envs:
                tg.create_task(one(env.name), name=f"{ctx.deploy_id}-rollout-{env.name}")
        return {
            env: [(r.deployment, r.ready, r.total, dict(r.images)) for r in results]
            for env, results in ctx.rollouts.items()
        }
