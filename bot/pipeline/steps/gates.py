"""Promotion gates: an env with `promotion: {after: staging, soak_minutes: N}` takes only a commit that
succeeded in `after`, with the same image digests, at least N minutes ago. An admin may override a gate
with a reason; the override is kept with the plan in the ledger and as a trailer of the GitOps commit."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from bot.errors import BotError
from bot.ledger import Ledger
from bot.ledger.models import DeployRecord, DeployState
from bot.models import Plan
from bot.settings import Environment, Service

HISTORY_DEPTH = 50  # how far back a gate looks for a success in its `after` env
PAGE = 10  # read that far page by page: the commit looked for is usually among the newest few


@dataclass(frozen=True)
class Eligible:
    """A commit an env's gate lets through: its short sha and the deploy in the gate's env that proved it."""

    short: str
    deploy_id: str
    since: datetime  # when the gate's soak time was met


def _succeeded(records: list[DeployRecord]) -> list[DeployRecord]:
    return [r for r in records if r.state is DeployState.SUCCEEDED and r.kind.changes_tags and r.sha]


async def _successes(ledger: Ledger, env: str) -> AsyncGenerator[DeployRecord]:
    """The env's successful deploys and rollbacks, newest first, among its last HISTORY_DEPTH records;
    read a page at a time, so a caller that finds what it wants early reads no further."""
    before: str | None = None
    for _ in range(0, HISTORY_DEPTH, PAGE):
        page, more = await ledger.history_page(env, PAGE, before=before)
        for r in _succeeded(page):
            yield r
        if not more:
            return
        before = page[-1].id


def _digests(record_plan: dict[str, object] | None, env: str) -> dict[str, str | None]:
    if not record_plan:
        return {}
    plan = Plan.from_json(dict(record_plan))
    ep = plan.env_plans.get(env)
    return {i.image: i.digest for i in ep.images} if ep else {}


async def gate_problem(ledger: Ledger, plan: Plan, env: Environment) -> str | None:
    """Why `plan` may not go to `env` yet (and which deploy would satisfy the gate); None when it may."""
    gate = env.promotion
    if gate is None:
        return None
    short, after = plan.commit.short, gate.after
    proof: DeployRecord | None = None
    try:
        async with aclosing(_successes(ledger, after)) as found:
            async for r in found:
                if r.sha == plan.commit.sha:
                    proof = r
                    break
    except BotError as e:
        return f"{env.name} takes only commits that succeeded in {after}, and the audit trail cannot say: {e.message}"
    if proof is None:
        return (
            f"{env.name} takes only commits that succeeded in {after}: {short} has no successful {after} "
            f"deploy. Deploy it there first: `deploy {after} {short}`"
        )
    theirs = _digests(proof.plan, after)
    ours = {i.image: i.digest for i in plan.env_plans[env.name].images}
    for image in (s.image for s in Service):
        if theirs.get(image) != ours.get(image):
            here = (ours.get(image) or "to be built")[:19]
            there = (theirs.get(image) or "unknown")[:19]
            return (
                f"{env.name} takes only the images that ran in {after}: {image}:{short} is {here} here but "
                f"{after}'s deploy {proof.id} ran {there}. Promote {after}'s image, or deploy {after} again with these"
            )
    finished = proof.finished_at or proof.updated_at
    ready = finished + timedelta(minutes=gate.soak_minutes)
    now = datetime.now(UTC)
    if now < ready:
        waited = (now - finished).total_seconds() / 60
        return (
            f"{env.name} takes a commit {gate.soak_minutes:g} min after it succeeded in {after}: deploy "
            f"{proof.id} finished {waited:.0f} min ago; {short} is eligible from {ready:%H:%M} UTC"
        )
    return None


async def eligible(ledger: Ledger, env: Environment, *, limit: int = 3) -> list[Eligible]:
    """The newest distinct commits that passed `env`'s gate (for status); [] for an env without one."""
    gate = env.promotion
    if gate is None:
        return []
    now = datetime.now(UTC)
    out: list[Eligible] = []
    async with aclosing(_successes(ledger, gate.after)) as found:
        async for r in found:
            since = (r.finished_at or r.updated_at) + timedelta(minutes=gate.soak_minutes)
            if since <= now and r.short and all(e.short != r.short for e in out):
                out.append(Eligible(r.short, r.id, since))
            if len(out) >= limit:
                break
    return out
