"""images: promote (registry → registry, digest kept) or build (linux/amd64), then re-check every image (F1, F4)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from bot.adapters.registry import RegistryUnavailable
from bot.errors import BotError, PermanentError, TransientError
from bot.ledger.models import LedgerError
from bot.models import AMD64, ImagePlan
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Retry, Step, StepProgress
from bot.pipeline.vocab import StepName
from bot.settings import DEFAULT_STEP_BUDGETS

PROMOTE_CONCURRENCY = 3


# A step that calls the registry: the client retries it itself, so the step does not retry what outlasted that.
REGISTRY_RETRY = Retry(not_again=(RegistryUnavailable,))


class Images(Step[DeployContext]):
    name = StepName.IMAGES
    timeout = DEFAULT_STEP_BUDGETS.images
    retry = REGISTRY_RETRY

    async def run(self, ctx: DeployContext, progress: StepProgress) -> Mapping[str, Any]:
        plan = ctx.require_plan()
        config = ctx.deps.config
        bound = asyncio.Semaphore(PROMOTE_CONCURRENCY)
        done: list[str] = []

        async def prepare(img: ImagePlan) -> None:
            try:
                await prepare_one(img)
            except BotError as e:
                raise with_reason(e, img) from e

        async def prepare_one(img: ImagePlan) -> None:
            env = config.env(img.env)
            async with bound:
                if img.action == "promote" and img.source_env is not None:
                    source = config.env(img.source_env)
                    await ctx.guard(f"promoting {img.image}:{img.tag} to {img.env}")
                    result = await ctx.deps.registry.promote(
                        source.registry, env.registry, img.image, img.tag
                    )
                    verb = "already there" if result.noop else f"promoted from {img.source_env}"
                elif img.action == "build":
                    if ctx.deps.builder is None:
                        raise PermanentError(
                            f"{img.image}:{img.tag} must be built but no builder is configured"
                        )
                    await ctx.guard(f"building {img.image}:{img.tag} in {img.env}")
                    await ctx.deps.builder.build(env, img.image, plan.commit.sha, plan.commit.short, progress)
                    verb = "built for linux/amd64"
                else:
                    return
            done.append(f"{img.env}/{img.image}:{img.tag} {verb}")
            await progress(done[-1], {"env": img.env, "image": img.image})

        async with asyncio.TaskGroup() as tg:
            for img in plan.images():
                tg.create_task(prepare(img), name=f"{ctx.deploy_id}-image-{img.env}-{img.image}")
        await verify_images(ctx)
        return {
            "prepared": done,
            "digests": {f"{env}/{image}": s.digest for (env, image), s in ctx.verified.items()},
        }


def with_reason(error: BotError, img: ImagePlan) -> BotError:
    """The same error, saying why preflight chose to promote or build (the registry had it for arm64 only,
    or not at all): that reason is in the plan, and a failure far from it must still tell it."""
    if not img.note or img.note in error.message or isinstance(error, LedgerError):
        return error  # a fencing or ledger refusal is about this bot, not the image: it passes unchanged
    verb = f"promoting from {img.source_env}" if img.action == "promote" else "building"
    message = f"{img.env}/{img.image}:{img.tag}: {img.note}, so {verb}: {error.message}"
    if isinstance(error, TransientError):
        return type(error)(message, hint=error.hint, delay=error.delay, data=error.data)
    return PermanentError(message, hint=error.hint, data=error.data)


async def verify_images(ctx: DeployContext) -> None:
    """Check, not assume: every image of the plan is in its TARGET registry with linux/amd64, right now."""
    plan = ctx.require_plan()
    registry = ctx.deps.registry
    config = ctx.deps.config
    imgs = plan.images()
    statuses = await asyncio.gather(
        *(registry.check(config.env(i.env).registry, i.image, i.tag, AMD64) for i in imgs)
    )
    missing = []
    for img, status in zip(imgs, statuses, strict=True):
        if status.ok:
            ctx.verified[(img.env, img.image)] = status
        else:
            ctx.verified.pop((img.env, img.image), None)
            found = ", ".join(status.platforms) if status.platforms else "not found"
            missing.append(f"{status.reference} ({found})")
    if missing:
        raise PermanentError(
            "refusing to touch git: not every image is in its target registry with linux/amd64:\n"
            + "\n".join(f"• {m}" for m in missing),
            hint="Nothing was pushed to the GitOps repo. Deploy again to promote or rebuild the images.",
        )
