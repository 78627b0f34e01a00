"""migrate: run golang-migrate as a Job in the env's own mode when migrations changed (F7, F8)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from bot.adapters.migrations import MigrateOutcome, MigrationFailed
from bot.errors import PermanentError
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Skip, Step, StepProgress
from bot.pipeline.events import DirtyMigration
from bot.pipeline.vocab import StepName
from bot.settings import DEFAULT_STEP_BUDGETS


class Migrate(Step[DeployContext]):
    name = StepName.MIGRATE
    timeout = DEFAULT_STEP_BUDGETS.migrate

    async def run(self, ctx: DeployContext, progress: StepProgress) -> Mapping[str, Any]:
        plan = ctx.require_plan()
        envs = [e for e in ctx.envs if plan.env_plans[e.name].run_migrations]
        if not envs:
            raise Skip("no migration changed since the deployed tag")
        short = plan.commit.short

        async def one(env_name: str) -> None:
            env = ctx.deps.config.env(env_name)
            await ctx.guard(f"the migration Job in {env.name}")
            try:
                run = await ctx.deps.migrations.up(ctx.deps.kube[env.kube_context], env, short)
            except MigrationFailed as e:
                ctx.migration_runs[env.name] = e.run
                result = e.run.result
                data: dict[str, Any] = {
                    "env": env.name,
                    "outcome": result.outcome.value,
                    "log": e.run.log[-1500:],
                }
                if result.outcome is MigrateOutcome.DIRTY and result.dirty_version is not None:
                    dirty = DirtyMigration(
                        env.name, result.dirty_version, result.outcome.value, e.run.log[-1500:]
                    )
                    data = dirty.to_json()
                raise PermanentError(e.message, hint=e.hint, data=data) from None
            ctx.migration_runs[env.name] = run
            applied = ", ".join(f"{m.version}/{m.name}" for m in run.result.applied) or "no change"
            await progress(f"{env.name}: {applied}", {"env": env.name})

        async with asyncio.TaskGroup() as tg:
            for env in envs:
                tg.create_task(one(env.name), name=f"{ctx.deploy_id}-migrate-{env.name}")
        return {
            env: {
                "outcome": run.result.outcome.value,
                "applied": [m.name for m in run.result.applied],
                "mode": ctx.deps.config.env(env).migrations.mode.value,
            }
            for env, run in ctx.migration_runs.items()
        }
