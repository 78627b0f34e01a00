"""Finding and resuming deploys no bot is running: a crashed or partitioned owner, a hand-over, our own orphan.

A deploy is taken over only through `Ledger.claim_deploy`, which moves its epoch on: the previous owner,
if it is still alive somewhere, is fenced out of every write and side effect from then on. Where the
deploy resumes depends on what it had done:
- the GitOps push is on the remote (the gitops step is recorded, or the overlays already hold the target):
  resume at sync, whose refresh + sync to the GitOps head is safe to repeat, then rollout and verify;
- nothing was pushed and its bot handed it over on a graceful stop: plan again and run it (nothing had
  changed in git, and promotion and `migrate up` are safe to repeat);
- nothing was pushed and its bot died: mark it interrupted ("deploy again"), since nobody chose to go on.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from bot.errors import TransientError
from bot.ledger import DeployRecord, DeployState, Fenced, LockHeld, StateConflict, StepState
from bot.models import Plan
from bot.pipeline.vocab import EventKind, StepName
from bot.runs import Run

if TYPE_CHECKING:
    from bot.service import DeployService

log = logging.getLogger(__name__)


async def orphans(service: DeployService) -> list[DeployRecord]:
    """Running deploys no live bot holds: handed over, or their lease lapsed (or was never taken)."""
    ledger = service.deps.ledger
    now = datetime.now(UTC)
    found: list[DeployRecord] = []
    for record in await ledger.in_flight():
        if record.state is not DeployState.RUNNING or service.running(record.id):
            continue
        # Ours with no task here: an orphan for sure (a run starts its task the moment it is recorded).
        if record.owner is not None and record.owner != service.instance_id:
            leases = [await ledger.get_lease(env) for env in record.envs]
            if any(lease and lease.deploy_id == record.id and lease.expires_at > now for lease in leases):
                continue  # its bot is alive and heart-beating
            if now - record.updated_at < timedelta(seconds=service.lease_ttl):
                continue  # too fresh: a live bot may not have taken its lease yet
        found.append(record)
    return found


async def resume(service: DeployService, record: DeployRecord) -> DeployRecord:
    """Take one orphan over and carry it to a final state (see the module docstring)."""
    ledger = service.deps.ledger
    handed_over = record.owner is None
    previous_owner = record.owner or "its previous bot"
    try:
        claimed = await ledger.claim_deploy(record.id, owner=service.instance_id, expect=record.fence)
    except (Fenced, StateConflict):
        # Two bots found the same orphan: the claim admits one; the other stands down quietly.
        log.info("deploy %s was already taken over", record.id)
        return record
    except TransientError as e:
        log.warning(
            "could not take deploy %s over yet (%s); the next recovery pass tries again", record.id, e.message
        )
        return record
    try:
        done = {s.step for s in await ledger.steps(record.id) if s.state is StepState.OK}
        pushed = record.kind.changes_tags and (StepName.GITOPS in done or await service.overlays_at(claimed))
    except TransientError as e:
        # Ours now, but where it stands is unreadable: the next pass finds it (ours, no task) and goes on.
        log.warning(
            "took deploy %s over but cannot read where it stands (%s); retrying", record.id, e.message
        )
        return claimed
    where = claimed.last_step or "start"
    return await service.guarded(
        claimed,
        lambda run: _carry_on(
            service, run, handed_over=handed_over, pushed=pushed, where=where, previous_owner=previous_owner
        ),
    )


async def _carry_on(
    service: DeployService, run: Run, *, handed_over: bool, pushed: bool, where: str, previous_owner: str
) -> DeployRecord:
    record = run.record
    try:
        await service.take_leases(run)
    except LockHeld as held:
        # Someone locked the env by hand while its bot was gone: say once why the deploy waits.
        if held.kind == "manual" and service.note_waiting(record.id):
            message = f"waiting to resume: {held.message} The deploy resumes once it is unlocked."
            await service.emit_for(record, StepName.RECOVERY, EventKind.PROGRESS, message)
        return record
    if pushed and record.plan is not None:
        run.ctx.plan = Plan.from_json(record.plan)
        run.ctx.commit = run.ctx.plan.commit
        how = "handed it over" if handed_over else "stopped"
        await service.emit_for(
            record,
            StepName.RECOVERY,
            EventKind.PROGRESS,
            f"{service.instance_id} took over from {previous_owner} ({how} after {where}); "
            "the push is on the remote, resuming at sync",
        )
        return await service.run_steps(run, service.post_push_steps())
    if handed_over:
        await service.emit_for(
            record,
            StepName.RECOVERY,
            EventKind.PROGRESS,
            f"{service.instance_id} took over from {previous_owner} (handed over after {where}); "
            "nothing was pushed yet, so it plans again and carries on",
        )
        return await service.replan_and_run(run)
    message = (
        f"interrupted after {where}: {previous_owner} stopped before anything reached git; "
        "nothing was pushed — deploy again"
    )
    await service.emit_for(record, StepName.RECOVERY, EventKind.FAILED, message)
    return await service.finish_with(run, DeployState.INTERRUPTED, message)
