"""resolve: the commit a user typed → full and short sha; what each env runs now; what changes (F9)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.errors import PermanentError
from bot.models import CommitInfo, EnvPlan, Plan
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Progress, Step
from bot.settings import Service


class Resolve(Step[DeployContext]):
    name = "resolve"
    timeout = 60.0

    async def run(self, ctx: DeployContext, progress: Progress) -> Mapping[str, Any]:
        deps = ctx.deps
        commit = await deps.app_repo.resolve(ctx.ref)
        ctx.commit = CommitInfo(commit.sha, commit.short, commit.subject, commit.author)
        tags = await deps.gitops.read_tags(deps.config, ctx.env_names)  # only these envs' overlays
        plan = Plan(ctx.deploy_id, ctx.kind, ctx.env_names, ctx.commit, rebuild=ctx.rebuild)
        migrations: set[str] = set()
        unknown_previous = False
        for env in ctx.envs:
            previous = {s.value: t for s, t in tags.get(env.name, {}).items()}
            plan.env_plans[env.name] = EnvPlan(env.name, previous=previous)
            prev_tag = previous.get(Service.API.value)
            prev_sha = await self._known(ctx, prev_tag)
            if prev_sha is None:
                unknown_previous = True
                continue
            if not plan.commits and prev_sha != commit.sha:
                between = await deps.app_repo.commits_between(prev_sha, commit.sha)
                plan.commits = [CommitInfo(c.sha, c.short, c.subject, c.author) for c in between]
            migrations.update(await deps.app_repo.migrations_changed(prev_sha, commit.sha))
        plan.migrations = sorted(migrations)
        # An overlay whose tag the app repo does not know gives no baseline: run `up`, which is
        # idempotent ("no change") rather than risk skipping a migration.
        run = bool(migrations) or unknown_previous or ctx.force_migrations
        for ep in plan.env_plans.values():
            ep.run_migrations = run
        ctx.plan = plan
        await progress(f"{ctx.ref} is {commit.short} “{commit.subject}” by {commit.author}", {})
        return {
            "sha": commit.sha,
            "short": commit.short,
            "subject": commit.subject,
            "previous": {e: ep.previous for e, ep in plan.env_plans.items()},
            "commits": len(plan.commits),
            "migrations": plan.migrations,
        }

    @staticmethod
    async def _known(ctx: DeployContext, tag: str | None) -> str | None:
        if not tag:
            return None
        try:
            return (await ctx.deps.app_repo.resolve(tag)).sha
        except PermanentError:
            return None
