"""The pipeline's vocabulary: the name of every step an event can carry, and the steps each kind of run takes.

Step names are a StrEnum: a name compares equal to the string the ledger stores (`StepName.GITOPS ==
"gitops"`), so stored rows and queries read the same as before."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from bot.models import DeployKind


class StepName(StrEnum):
    RESOLVE = "resolve"
    PREFLIGHT = "preflight"
    APPROVAL = "approval"  # the service's wait for a second person, not a pipeline step
    IMAGES = "images"
    MIGRATE = "migrate"
    GITOPS = "gitops"
    SYNC = "sync"
    ROLLOUT = "rollout"
    VERIFY = "verify"
    FORCE_MIGRATE = "force-migrate"
    LOCK = "lock"  # a refusal before any step ran: the env is locked or leased
    RECOVERY = "recovery"  # another bot took the deploy over, or this one left it
    DEPLOY = "deploy"  # the event that closes a run: its payload is the summary a reporter shows


SUMMARY_STEP = StepName.DEPLOY


class EventKind(StrEnum):
    STARTED = "started"
    PROGRESS = "progress"
    DONE = "done"
    SKIPPED = "skipped"
    RETRYING = "retrying"
    FAILED = "failed"
    ERRORED = "errored"
    CANCELLED = "cancelled"


# The steps of each kind of run, in order: planning, then what a deploy's, a rollback's or a migration's
# execution runs (a forced migration is not planned: it runs its one step).
PLAN_STEPS: tuple[StepName, ...] = (StepName.RESOLVE, StepName.PREFLIGHT)
EXECUTE_STEPS: tuple[StepName, ...] = (
    StepName.IMAGES,
    StepName.MIGRATE,
    StepName.GITOPS,
    StepName.SYNC,
    StepName.ROLLOUT,
    StepName.VERIFY,
)
MIGRATE_STEPS: tuple[StepName, ...] = (StepName.IMAGES, StepName.MIGRATE)
RUN_STEPS: Mapping[DeployKind, tuple[StepName, ...]] = {
    DeployKind.DEPLOY: (*PLAN_STEPS, *EXECUTE_STEPS),
    DeployKind.ROLLBACK: (*PLAN_STEPS, *EXECUTE_STEPS),
    DeployKind.MIGRATE: (*PLAN_STEPS, *MIGRATE_STEPS),
    DeployKind.FORCE_MIGRATE: (StepName.FORCE_MIGRATE,),
}
# They run only once the overlays are pushed (or on a resume after the push).
POST_PUSH_STEPS: tuple[StepName, ...] = (StepName.SYNC, StepName.ROLLOUT, StepName.VERIFY)


# Why a run was stopped, passed as the cancel message, and what its step line says. Only a person cancels;
# a hand-over or a lost lease is the bot stepping aside for another, and the deploy goes on there.
STOP_CANCEL, STOP_HANDOVER, STOP_LOST = "cancel", "handover", "lost"
STOPPED = {
    STOP_CANCEL: "cancelled",
    STOP_HANDOVER: "handed over to another bot",
    STOP_LOST: "stopped: this bot lost its lease",
}
