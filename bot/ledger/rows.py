"""Row -> record converters and the small predicates (fencing, env targets) the ledger's queries share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, exists

from bot.ledger import schema as s
from bot.ledger.models import (
    Approval,
    ApprovalState,
    DecisionKind,
    DeployRecord,
    DeployState,
    Fence,
    Fenced,
    IncidentRecord,
    Lease,
    ManualLock,
    StepRecord,
    StepState,
    when,
)
from bot.models import DeployKind


def _as_kind(value: str) -> DeployKind:
    return DeployKind(str(value))


def _decision(state: str) -> DecisionKind:
    return "approve" if state == ApprovalState.APPROVED else "deny"


def _check_envs(envs: Sequence[str], *maps: Mapping[str, str]) -> None:
    for m in maps:
        stray = set(m) - set(envs)
        if stray:
            raise ValueError(
                f"tags for env(s) {sorted(stray)} that the deploy does not target ({list(envs)})"
            )


def _owned_by(fence: Fence) -> ColumnElement[bool]:
    return and_(s.deploys.c.owner == fence.owner, s.deploys.c.epoch == fence.epoch)


def _fence_why(owner: str | None, epoch: int) -> str:
    if owner is None:
        return "it was handed over and awaits a bot to resume it"
    return f"{owner} took it over (epoch {epoch})"


def _check_fence(current: DeployRecord, fence: Fence | None) -> None:
    if fence is not None and (current.owner, current.epoch) != (fence.owner, fence.epoch):
        raise Fenced(current.id, _fence_why(current.owner, current.epoch))


def _lease_why(mine: Lease, row: Row[Any] | None, now: datetime) -> str:
    if row is None or row.released_at is not None:
        return f"its lease on {mine.env} was released"
    if (row.holder, row.deploy_id, row.epoch) != (mine.holder, mine.deploy_id, mine.epoch):
        return f"{row.holder} holds {mine.env} now (epoch {row.epoch}, deploy {row.deploy_id})"
    return f"its lease on {mine.env} lapsed at {when(row.expires_at, now)}"


def _touches(env: str) -> ColumnElement[bool]:
    return exists().where(s.deploy_targets.c.deploy_id == s.deploys.c.id, s.deploy_targets.c.env == env)


def _deploy(r: Row[Any], targets: Sequence[Row[Any]]) -> DeployRecord:
    return DeployRecord(
        id=r.id,
        kind=_as_kind(r.kind),
        envs=tuple(r.envs),
        ref=r.ref,
        sha=r.sha,
        short=r.short,
        requester=r.requester,
        approver=r.approver,
        state=DeployState(r.state),
        plan=r.plan,
        message=r.message,
        channel=r.channel,
        thread_ts=r.thread_ts,
        created_at=r.created_at,
        updated_at=r.updated_at,
        finished_at=r.finished_at,
        owner=r.owner,
        last_step=r.last_step,
        tags={t.env: t.tag for t in targets if t.tag is not None},
        previous_tags={t.env: t.previous_tag for t in targets if t.previous_tag is not None},
        epoch=r.epoch,
        cancel_requested_by=r.cancel_requested_by,
        cancel_requested_at=r.cancel_requested_at,
        origin=r.origin,
    )


def _step(r: Row[Any]) -> StepRecord:
    return StepRecord(
        id=r.id,
        deploy_id=r.deploy_id,
        env=r.env,
        step=r.step,
        state=StepState(r.state),
        started_at=r.started_at,
        finished_at=r.finished_at,
        detail=r.detail,
    )


def _lease(r: Row[Any], *, taken_over_from: str | None = None) -> Lease:
    return Lease(
        env=r.env,
        holder=r.holder,
        deploy_id=r.deploy_id,
        acquired_at=r.acquired_at,
        expires_at=r.expires_at,
        heartbeat_at=r.heartbeat_at,
        taken_over_from=taken_over_from,
        epoch=r.epoch,
    )


def _incident(r: Row[Any]) -> IncidentRecord:
    return IncidentRecord(
        id=r.id,
        env=r.env,
        kind=r.kind,
        key=r.key,
        title=r.title,
        detail=dict(r.detail or {}),
        opened_at=r.opened_at,
        updated_at=r.updated_at,
        closed_at=r.closed_at,
        channel=r.channel,
        message_ts=r.message_ts,
    )


def _lock(r: Row[Any]) -> ManualLock:
    return ManualLock(env=r.env, user=r.user, reason=r.reason, since=r.since)


def _approval(r: Row[Any], *, state: ApprovalState | None = None) -> Approval:
    return Approval(
        deploy_id=r.deploy_id,
        binding=r.binding,
        requester=r.requester,
        requested_at=r.requested_at,
        expires_at=r.expires_at,
        state=state or ApprovalState(r.state),
        decided_by=r.decided_by,
        decided_at=r.decided_at,
    )
