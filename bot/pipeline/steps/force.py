"""force-migrate: the guarded recovery from a dirty database (F7): `force X`, then `up` again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.adapters.migrations import MigrationFailed
from bot.errors import PermanentError
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Step, StepProgress
from bot.pipeline.vocab import StepName
from bot.settings import DEFAULT_STEP_BUDGETS, Service


class ForceMigrate(Step[DeployContext]):
    name = StepName.FORCE_MIGRATE
    timeout = DEFAULT_STEP_BUDGETS.force_migrate

    def __init__(self, version: int, reported_dirty: int | None, image_tag: str | None) -> None:
        self.version = version
        self.reported_dirty = reported_dirty
        self.image_tag = image_tag  # the migrate image of the run that left the database dirty

    async def run(self, ctx: DeployContext, progress: StepProgress) -> Mapping[str, Any]:
        env = ctx.envs[0]
        # The image of the run that failed knows the dirty version; the overlay's (older) one may not.
        tag = self.image_tag
        if not tag:
            tags = await ctx.deps.gitops.read_tags(ctx.deps.config, [env.name])
            tag = tags.get(env.name, {}).get(Service.API)
        if not tag:
            raise PermanentError(f"no overlay tag for {env.name}: cannot pick the migrate image to run")
        client = ctx.deps.kube[env.kube_context]
        await ctx.guard(f"forcing version {self.version} in {env.name}")
        try:
            forced = await ctx.deps.migrations.force(
                client, env, tag, self.version, reported_dirty=self.reported_dirty
            )
            await progress(f"{env.name}: forced version {self.version}", {"env": env.name})
            await ctx.guard(f"migrate up in {env.name}")
            up = await ctx.deps.migrations.up(client, env, tag)
        except MigrationFailed as e:
            raise PermanentError(
                e.message, hint=e.hint, data={"env": env.name, "log": e.run.log[-1500:]}
            ) from None
        applied = [m.name for m in up.result.applied]
        await progress(f"{env.name}: up → {', '.join(applied) or 'no change'}", {"env": env.name})
        return {
            "env": env.name,
            "forced": self.version,
            "applied": applied,
            "image_tag": tag,
            "ok": forced.succeeded,
        }
