"""How a deploy's outcome is told: its start and finish log lines, the final summary's facts, and the
retry that carries a ledger write through an outage. Split out of bot/service.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from bot.adapters.endpoints import summary_line
from bot.errors import TransientError
from bot.ledger.models import (
    DeployRecord,
    DeployState,
)
from bot.logs import deploy_context
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import PipelineResult, StepOutcome
from bot.pipeline.events import DeploySummary, ForcedClean
from bot.pipeline.steps.resolve import downgrade_problems
from bot.pipeline.vocab import StepName
from bot.settings import Service

log = logging.getLogger("bot.service")  # the service's logger, as before the split


def _log_started(record: DeployRecord) -> None:
    """The one line that marks a deploy's start (the bot that records it), for log-based queries."""
    with deploy_context(record.id, record.envs):
        log.info(
            "deploy started: %s of %s to %s by %s",
            record.kind.value,
            record.ref,
            ", ".join(record.envs),
            record.requester,
            extra={"deploy_kind": record.kind.value, "ref": record.ref, "requester": record.requester},
        )


def _log_finished(record: DeployRecord, summary: DeploySummary) -> None:
    """The one line that marks a deploy's end (its final summary): the outcome and how long it took."""
    outcome = summary.state or record.state.value
    seconds = summary.seconds
    took = f" in {seconds:g} s" if seconds is not None else ""
    where = summary.failed_step
    at = f" at {where}" if where and outcome != DeployState.SUCCEEDED.value else ""
    with deploy_context(record.id, record.envs):
        log.log(
            logging.INFO if outcome == DeployState.SUCCEEDED.value else logging.WARNING,
            "deploy finished: %s%s%s",
            outcome,
            at,
            took,
            extra={
                "deploy_kind": record.kind.value,
                "outcome": outcome,
                "duration_seconds": seconds,
                "failed_step": where,
            },
        )


T = TypeVar("T")


async def _until_the_ledger_answers(write: Callable[[], Awaitable[T]]) -> T:
    """Retry a ledger write through an outage, backing off to 5 s; other errors (Fenced) pass through."""
    delay = 0.2
    while True:
        try:
            return await write()
        except TransientError as e:
            log.warning("%s; retrying in %.1f s", e.message, delay)  # says unreachable, busy or disk full
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def deploy_summary(
    record: DeployRecord, ctx: DeployContext | None, result: PipelineResult | None, **known: Any
) -> DeploySummary:
    """The final reply's facts: duration, images with digests, the Argo CD
    revision, where it stopped."""
    failed = result.failed if result else None
    forced = next((r for r in result.results if r.step == StepName.FORCE_MIGRATE), None) if result else None
    revision = next((r.revision for rs in ctx.synced.values() for r in rs), None) if ctx else None
    summary = DeploySummary(
        state=record.state.value,
        deploy_kind=record.kind.value,
        envs=tuple(record.envs),
        short=record.short,
        seconds=round((datetime.now(UTC) - record.created_at).total_seconds(), 1),
        images={f"{env}/{image}": s.digest for (env, image), s in sorted(ctx.verified.items())}
        if ctx
        else {},
        revision=revision,
        endpoints={env: summary_line(checks) for env, checks in ctx.endpoints.items()} if ctx else {},
        failed_step=failed.step if failed else None,
        hint=failed.hint if failed else None,
        failure=dict(failed.data) if failed else {},
        # a force-migrate says which version it marked clean and what `up` applied after it
        force=ForcedClean(forced.data.get("forced"), tuple(forced.data.get("applied", [])))
        if forced is not None and forced.outcome is StepOutcome.OK
        else None,
        rollback_to={e: ep.previous.get(Service.API.value) for e, ep in ctx.plan.env_plans.items()}
        if ctx and ctx.plan
        else {},
        # refused only for want of the requester's yes to moving back: the thread offers that second yes
        move_back=tuple(downgrade_problems(ctx.plan))
        if ctx and ctx.plan and failed and failed.step == StepName.PREFLIGHT
        else (),
    )
    return replace(summary, **known) if known else summary
