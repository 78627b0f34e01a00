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

from bot.adapters.apprepo import AppRepo, Commit
from bot.errors import BotError, PermanentError
from bot.ledger.models import DeployState
from bot.models import CommitInfo, DeployKind, EnvPlan, Plan, ServiceMove, plural
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Step, StepProgress
from bot.pipeline.events import Resolved
from bot.pipeline.vocab import StepName
from bot.settings import DEFAULT_STEP_BUDGETS, Service


def up_migrations(paths: list[str]) -> list[str]:
    """Only `.up.sql` files run on `migrate up`; `.down.sql` files never do."""
    return sorted(p for p in paths if p.endswith(".up.sql"))


class Resolve(Step[DeployContext]):
    name = StepName.RESOLVE
    timeout = DEFAULT_STEP_BUDGETS.resolve

    async def run(self, ctx: DeployContext, progress: StepProgress) -> Mapping[str, Any]:
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
        reads = _Reads(deps.app_repo)
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
                move = await self._move(reads, service, prev_tag, commit)
                ep.moves.append(move)
                unknown_previous |= move.kind == "unknown"
                if move.kind in ("forward", "diverged") and prev_tag is not None:
                    prev_sha = await reads.known(prev_tag)
                    if prev_sha is not None:
                        migrations.update(await reads.migrations_changed(prev_sha, commit.sha))
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
            **Resolved(commit.subject).to_json(),
            "previous": {e: ep.previous for e, ep in plan.env_plans.items()},
            "moves": {e: {m.service: m.kind for m in ep.moves} for e, ep in plan.env_plans.items()},
            "commits": len(plan.commits),
            "migrations": plan.migrations,
            "warnings": plan.warnings,
        }

    async def _move(
        self, repo: _Reads, service: Service, prev_tag: str | None, commit: Commit
    ) -> ServiceMove:
        prev_sha = await repo.known(prev_tag)
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


class _Reads:
    """The app repo's reads for one resolve, each asked of git once.

    The services of an env usually run the same tag, and every env's moves compare against the same
    commit: without this each service paid the same five or six git processes again (a tenth of a second
    of a poc deploy). The answers for two full shas cannot change; a tag's commit is read once per plan."""

    def __init__(self, repo: AppRepo) -> None:
        self.repo = repo
        self._known: dict[str, str | None] = {}
        self._between: dict[tuple[str, str], list[Commit]] = {}
        self._migrations: dict[tuple[str, str], list[str]] = {}

    async def known(self, tag: str | None) -> str | None:
        """The full sha the tag names in the app repo, or None (no tag, or one the repo does not know)."""
        if not tag:
            return None
        if tag not in self._known:
            try:
                self._known[tag] = (await self.repo.resolve(tag)).sha
            except PermanentError:
                self._known[tag] = None
        return self._known[tag]

    async def commits_between(self, old_sha: str, new_sha: str) -> list[Commit]:
        key = (old_sha, new_sha)
        if key not in self._between:
            self._between[key] = await self.repo.commits_between(old_sha, new_sha)
        return list(self._between[key])

    async def migrations_changed(self, old_sha: str, new_sha: str) -> list[str]:
        key = (old_sha, new_sha)
        if key not in self._migrations:
            self._migrations[key] = await self.repo.migrations_changed(old_sha, new_sha)
        return list(self._migrations[key])


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
