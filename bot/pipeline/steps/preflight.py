"""preflight: read-only checks, all concurrent — images in each TARGET registry, Argo CD idle, env not locked."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from bot.adapters.argocd import operation_running
from bot.errors import BotError, PermanentError
from bot.models import AMD64, ImagePlan, Plan, deployed_images
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Step, StepProgress
from bot.pipeline.steps.gates import gate_problem
from bot.pipeline.steps.images import REGISTRY_RETRY
from bot.pipeline.steps.resolve import downgrade_problems
from bot.pipeline.vocab import StepName
from bot.policy import locks
from bot.settings import DEFAULT_STEP_BUDGETS, Environment


class Preflight(Step[DeployContext]):
    name = StepName.PREFLIGHT
    timeout = DEFAULT_STEP_BUDGETS.preflight
    retry = REGISTRY_RETRY

    async def run(self, ctx: DeployContext, progress: StepProgress) -> Mapping[str, Any]:
        plan = ctx.require_plan()
        short = plan.commit.short
        image_jobs = [
            self._image(ctx, env, image, short)
            for env in ctx.envs
            for image in deployed_images(plan.env_plans[env.name].run_migrations)
        ]
        other_jobs = [self._argocd(ctx, env) for env in ctx.envs] + [self._lock(ctx, env) for env in ctx.envs]
        results = await asyncio.gather(*image_jobs, *other_jobs)
        images: list[ImagePlan] = [r for r in results[: len(image_jobs)] if isinstance(r, ImagePlan)]
        problems = [p for r in results[len(image_jobs) :] if isinstance(r, list) for p in r]
        for img in images:
            plan.env_plans[img.env].images.append(img)
            if img.action == "build" and ctx.deps.builder is None:
                problems.append(
                    f"{img.image}:{img.tag} is in no environment's registry and this bot has no builder configured"
                )
        problems += downgrade_problems(plan)
        plan.overridden = []
        for env in ctx.envs:
            gate = await gate_problem(ctx.deps.ledger, plan, env)
            if gate is None:
                continue
            if plan.override_reason:
                plan.overridden.append(gate)  # an admin's decision, kept with the plan and in the commit
            else:
                problems.append(f"{gate}. An admin can go past the gate: `--override <reason>`")
        plan.problems = problems
        await progress(_summary(plan), {})
        if problems:
            raise PermanentError(
                "preflight found "
                + ("a problem" if len(problems) == 1 else f"{len(problems)} problems")
                + ":\n"
                + "\n".join(f"• {p}" for p in problems),
                hint="Nothing was changed. Fix these, then deploy again.",
            )
        return {"images": [(i.env, i.image, i.action, i.digest) for i in images]}

    async def _image(self, ctx: DeployContext, env: Environment, image: str, tag: str) -> ImagePlan:
        registry = ctx.deps.registry
        status = await registry.check(env.registry, image, tag, AMD64)
        if ctx.rebuild:
            note = "rebuild requested: built from source for linux/amd64 over whatever the registry holds"
            return ImagePlan(env.name, image, tag, "build", None, platforms=status.platforms, note=note)
        if status.ok:
            return ImagePlan(env.name, image, tag, "present", status.digest, platforms=status.platforms)
        note = (
            f"{env.name} registry has it for {', '.join(status.platforms) or 'no platform'} only"
            if status.state == "wrong_platform"
            else f"missing from the {env.name} registry"
        )
        # Each env's registry is isolated: look for an amd64 copy elsewhere to promote, else build.
        for other in ctx.deps.config.environments:
            if other.name == env.name:
                continue
            try:
                found = await registry.check(other.registry, image, tag, AMD64)
            except BotError:
                continue  # another env's registry being down must not block this one
            if found.ok:
                return ImagePlan(
                    env.name, image, tag, "promote", found.digest, other.name, found.platforms, note
                )
        return ImagePlan(env.name, image, tag, "build", None, platforms=status.platforms, note=note)

    async def _argocd(self, ctx: DeployContext, env: Environment) -> list[str]:
        argocd = ctx.deps.argocd(env)
        problems = []
        for app in env.argocd.applications.values():
            try:
                obj = await argocd.get(app)
            except PermanentError as e:
                problems.append(e.message)
                continue
            if operation_running(obj):
                problems.append(
                    f"Argo CD {app} in {env.name} has an operation running; wait for it to finish"
                )
        return problems

    async def _lock(self, ctx: DeployContext, env: Environment) -> list[str]:
        return [
            locks.describe(lock)
            for lock in locks.blocking(await ctx.deps.ledger.locks(), [env.name], ctx.kind)
        ]


def _summary(plan: Plan) -> str:
    parts = []
    for img in plan.images():
        if img.action == "present":
            parts.append(f"{img.env}/{img.image} present")
        elif img.action == "promote":
            parts.append(f"{img.env}/{img.image} promote from {img.source_env}")
        else:
            parts.append(f"{img.env}/{img.image} build")
    return "; ".join(parts)
