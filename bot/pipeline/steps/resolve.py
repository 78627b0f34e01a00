"""resolve: the commit a user typed → full and short sha; what each env runs now; how each service moves (F9).

Each service of each env gets its own move, told truthfully: forward (the commits it adds), unchanged,
or a downgrade (the commits it drops, and the migrations among them that stay applied: golang-migrate's
`up` never reverts). A move back needs the requester's confirmation (`--allow-downgrade`), which the plan
records; a rollback needs it only across a migration boundary. A commit whose deploy or migration failed
in another env carries that warning, with the deploy id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from bot.adapters.apprepo import Commit
from bot.errors import BotError, PermanentError
from bot.ledger.models import DeployState
from bot.models import CommitInfo, DeployKind, EnvPlan, Plan, ServiceMove, plural
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Progress, Step
from bot.settings import DEFAULT_STEP_BUDGETS, Service


def up_migrations(paths: list[str]) -> list[str]:
    """Only `.up.sql` files run on `migrate up`; `.down.sql` files never do."""
    return sorted(p for p in paths if p.endswith(".up.sql"))


class Resolve(Step[DeployContext]):
    name = "resolve"
    timeout = DEFAULT_STEP_BUDGETS.resolve

    async def run(self, ctx: DeployContext, progress: Progress) -> Mapping[str, Any]:
        deps = ctx.deps
        # The two repositories are independent: their fetches (each a round trip to the git host) overlap.
        reading = asyncio.create_task(
            deps.gitops.read_tags(deps.config, ctx.env_names),  # only these envs' overlays
            name=f"resolve-overlays-{ctx.deploy_id}",
        )
        try:
            commit = await deps.app_repo.resolve(ctx.ref)
        except BaseException:
            # let the overlay read finish (its git runs in a thread, holding the clone) before failing;
            # the resolve's error is the one to report
            await asyncio.wait({reading})
            if not reading.cancelled():
                reading.exception()
            raise
        ctx.commit = CommitInfo(commit.sha, commit.short, commit.subject, commit.author)
        tags = await reading
        plan = Plan(
            ctx.deploy_id,
            ctx.kind,
            ctx.env_names,
            ctx.commit,
            rebuild=ctx.rebuild,
            allow_downgrade=ctx.allow_downgrade,
            override_reason=ctx.override_reason,
        )
        migrations: set[str] = set()
        unknown_previous = False
        for env in ctx.envs:
            previous = {s.value: t for s, t in tags.get(env.name, {}).items()}
            ep = plan.env_plans[env.name] = EnvPlan(env.name, previous=previous)
            for service in Service:
                prev_tag = previous.get(service.value)
                move = await self._move(ctx, service, prev_tag, commit)
                ep.moves.append(move)
                unknown_previous |= move.kind == "unknown"
                if move.kind in ("forward", "diverged") and prev_tag is not None:
                    prev_sha = await self._known(ctx, prev_tag)
                    if prev_sha is not None:
                        migrations.update(await deps.app_repo.migrations_changed(prev_sha, commit.sha))
                if not plan.commits and move.ahead:
                    plan.commits = list(move.ahead)
        plan.migrations = up_migrations(sorted(migrations))
        # An overlay whose tag the app repo does not know gives no baseline: run `up`, which is
        # idempotent ("no change") rather than risk skipping a migration.
        run = bool(plan.migrations) or unknown_previous or ctx.force_migrations
        for ep in plan.env_plans.values():
            ep.run_migrations = run
        plan.warnings = await self._failed_elsewhere(ctx, commit)
        ctx.plan = plan
        await progress(f"{ctx.ref} is {commit.short} “{commit.subject}” by {commit.author}", {})
        return {
            "sha": commit.sha,
            "short": commit.short,
            "subject": commit.subject,
            "previous": {e: ep.previous for e, ep in plan.env_plans.items()},
            "moves": {e: {m.service: m.kind for m in ep.moves} for e, ep in plan.env_plans.items()},
            "commits": len(plan.commits),
            "migrations": plan.migrations,
            "warnings": plan.warnings,
        }

    async def _move(
        self, ctx: DeployContext, service: Service, prev_tag: str | None, commit: Commit
    ) -> ServiceMove:
        repo = ctx.deps.app_repo
        prev_sha = await self._known(ctx, prev_tag)
        if prev_tag is None or prev_sha is None:
            return ServiceMove(service.value, prev_tag or "", "unknown")
        if prev_sha == commit.sha:
            return ServiceMove(service.value, prev_tag, "unchanged")
        ahead = [_info(c) for c in await repo.commits_between(prev_sha, commit.sha)]
        behind = [_info(c) for c in await repo.commits_between(commit.sha, prev_sha)]
        kept = up_migrations(await repo.migrations_changed(commit.sha, prev_sha)) if behind else []
        if behind and ahead:
            return ServiceMove(service.value, prev_tag, "diverged", ahead, behind, kept)
        if behind:
            return ServiceMove(service.value, prev_tag, "downgrade", [], behind, kept)
        return ServiceMove(service.value, prev_tag, "forward", ahead)

    @staticmethod
    async def _known(ctx: DeployContext, tag: str | None) -> str | None:
        if not tag:
            return None
        try:
            return (await ctx.deps.app_repo.resolve(tag)).sha
        except PermanentError:
            return None

    @staticmethod
    async def _failed_elsewhere(ctx: DeployContext, commit: Commit) -> list[str]:
        """The newest run of this commit in each other env, when it failed there (deploy or migration)."""
        warnings: list[str] = []
        for env in ctx.deps.config.environments:
            if env.name in ctx.env_names:
                continue
            try:
                records = await ctx.deps.ledger.history(env.name, 20)
            except BotError:
                continue  # the audit trail being unreachable must not block the plan
            for record in records:
                if record.sha != commit.sha or record.id == ctx.deploy_id:
                    continue
                if record.state is DeployState.FAILED:
                    what = "migration" if record.kind is DeployKind.MIGRATE else record.kind.value
                    warnings.append(
                        f"{commit.short} failed in {env.name}: {what} {record.id} — {record.message or 'failed'}"
                    )
                break
        return warnings


def _info(c: Commit) -> CommitInfo:
    return CommitInfo(c.sha, c.short, c.subject, c.author)


def downgrade_problems(plan: Plan) -> list[str]:
    """Moves back that need the requester's confirmation and do not have it."""
    if plan.allow_downgrade:
        return []
    problems = []
    for env, ep in plan.env_plans.items():
        for move in ep.going_back():
            kept = move.kept_migrations
            if plan.kind is DeployKind.ROLLBACK and not kept:
                continue  # a rollback is a move back by design; only a migration boundary needs a second yes
            text = (
                f"{env}/{move.service} would move back {plural(len(move.behind), 'commit')} "
                f"({move.previous} → {plan.commit.short})"
            )
            if kept:
                text += f"; migrations {', '.join(m.rsplit('/', 1)[-1] for m in kept)} stay applied (not reverted)"
            problems.append(text + ": confirm with --allow-downgrade")
    return problems
