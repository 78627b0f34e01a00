"""rollout: watch the Deployments and their new pods; fail fast with a diagnosis on pull/crash errors (F3, F10)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from bot.adapters.rollout import RolloutFailed, RolloutProgress, watch_rollouts
from bot.errors import PermanentError
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Step, StepProgress
from bot.pipeline.events import Diagnosed
from bot.pipeline.vocab import StepName
from bot.settings import DEFAULT_STEP_BUDGETS, Service


class Rollout(Step[DeployContext]):
    name = StepName.ROLLOUT
    timeout = DEFAULT_STEP_BUDGETS.rollout

    async def run(self, ctx: DeployContext, progress: StepProgress) -> Mapping[str, Any]:
        give_up = ctx.deps.config.timeouts.rollout

        async def one(env_name: str) -> None:
            env = ctx.deps.config.env(env_name)

            async def report(p: RolloutProgress) -> None:
                await progress(
                    f"{env.name}/{p.deployment}: {p.ready}/{p.total} ready",
                    {"env": env.name, "deployment": p.deployment, "ready": p.ready, "total": p.total},
                )

            try:
                ctx.rollouts[env.name] = await watch_rollouts(
                    ctx.deps.kube[env.kube_context],
                    env.namespace,
                    [s.image for s in Service],
                    diagnoser=ctx.deps.diagnoser(env),
                    give_up_after=give_up,
                    progress=report,
                )
            except RolloutFailed as e:
                raise PermanentError(e.message, hint=e.hint, data=diagnosis_data(env.name, e)) from None

        async with asyncio.TaskGroup() as tg:
            for env in ctx.envs:
                tg.create_task(one(env.name), name=f"{ctx.deploy_id}-rollout-{env.name}")
        return {
            env: [(r.deployment, r.ready, r.total, dict(r.images)) for r in results]
            for env, results in ctx.rollouts.items()
        }


def diagnosis_data(env: str, e: RolloutFailed) -> dict[str, Any]:
    """What a reporter needs to show the diagnosis and offer its fixes (Roll back / Promote / Rebuild)."""
    d = e.diagnosis
    if d is None:
        return {"env": env, "deployment": e.deployment}
    return Diagnosed(
        env,
        d.cause,
        d.evidence,
        d.fix,
        d.kind.value,
        d.pod,
        e.deployment,
        tuple(d.promote_from),
        dict(d.details),
    ).to_json()
