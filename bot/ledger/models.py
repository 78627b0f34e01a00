"""What the ledger hands out: plain frozen dataclasses and the errors that explain a refusal."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from bot.errors import PermanentError
from bot.models import DeployKind
from bot.mrkdwn import mention


class DeployState(StrEnum):
    PLANNED = "planned"
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DENIED = "denied"
    EXPIRED = "expired"
    INTERRUPTED = "interrupted"

    @property
    def terminal(self) -> bool:
        return self not in (DeployState.PLANNED, DeployState.AWAITING_APPROVAL, DeployState.RUNNING)


IN_FLIGHT_STATES = (DeployState.RUNNING, DeployState.AWAITING_APPROVAL)


class StepState(StrEnum):
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"  # the check said no
    ERRORED = "errored"  # a system was unreachable
    SKIPPED = "skipped"


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    VOID = "void"


DecisionKind = Literal["approve", "deny"]


@dataclass(frozen=True, slots=True)
class DeployRecord:
    """One line of the audit trail: a deploy, rollback or migration and where it got to."""

    id: str
    kind: DeployKind
    envs: tuple[str, ...]
    ref: str
    sha: str | None
    short: str | None
    requester: str
    approver: str | None
    state: DeployState
    plan: dict[str, Any] | None
    message: str | None
    channel: str | None
    thread_ts: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    owner: str | None
    last_step: str | None
    # env -> tag this record put in the env's overlays (deploys and rollbacks only)
    tags: dict[str, str] = field(default_factory=dict)
    # env -> tag the overlays held before this record ran, when the service knew it
    previous_tags: dict[str, str] = field(default_factory=dict)
    # the owner's fencing token: a take-over increments it, and every write by the owner names it
    epoch: int = 0
    # a person asked to stop it (through any replica); the owner acts on it
    cancel_requested_by: str | None = None
    cancel_requested_at: datetime | None = None
    # "slack", or "cli:<os user>@<host>": where the request came from, next to its principal
    origin: str | None = None

    @property
    def fence(self) -> Fence | None:
        """The (owner, epoch) pair a write about this deploy must present, if it has an owner."""
        return Fence(self.owner, self.epoch) if self.owner else None


@dataclass(frozen=True, slots=True)
class StepRecord:
    id: int
    deploy_id: str
    env: str | None
    step: str
    state: StepState
    started_at: datetime
    finished_at: datetime | None
    detail: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to change one env, held by one bot instance for one deploy until it expires."""

    env: str
    holder: str
    deploy_id: str
    acquired_at: datetime
    expires_at: datetime
    heartbeat_at: datetime
    # the deploy whose expired lease this one replaced (its bot crashed or hung), if any
    taken_over_from: str | None = None
    # the env's fencing token: grows with every acquisition that is not a live renewal
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Control:
    """The few fields of a deploy its running bot watches: who owns it, and whether someone asked to stop."""

    state: DeployState
    owner: str | None
    epoch: int
    cancel_requested_by: str | None


@dataclass(frozen=True, slots=True)
class Fence:
    """Who may write about a deploy: its owner at one epoch. A stale owner's write changes nothing."""

    owner: str
    epoch: int


@dataclass(frozen=True, slots=True)
class ManualLock:
    env: str
    user: str
    reason: str
    since: datetime


@dataclass(frozen=True, slots=True)
class IncidentRecord:
    """Something wrong with an env that no deploy is handling, as the watcher saw it; closed when it ended."""

    id: int
    env: str
    kind: str
    key: str
    title: str
    detail: dict[str, Any]
    opened_at: datetime
    updated_at: datetime
    closed_at: datetime | None = None
    channel: str | None = None
    message_ts: str | None = None

    @property
    def open(self) -> bool:
        return self.closed_at is None


@dataclass(frozen=True, slots=True)
class Approval:
    deploy_id: str
    binding: str
    requester: str
    requested_at: datetime
    expires_at: datetime
    state: ApprovalState
    decided_by: str | None
    decided_at: datetime | None


@dataclass(frozen=True, slots=True)
class Decision:
    deploy_id: str
    decision: DecisionKind
    user: str
    at: datetime


def who(user: str) -> str:
    """A Slack user ID renders as a mention in Slack and stays readable in a terminal."""
    return mention(user)


def when(at: datetime, now: datetime | None = None) -> str:
    text = at.strftime("%Y-%m-%d %H:%M UTC")
    if now is None:
        return text
    secs = int((now - at).total_seconds())
    if secs < 0:
        return text
    if secs < 60:
        ago = f"{secs} s ago"
    elif secs < 3600:
        ago = f"{secs // 60} min ago"
    elif secs < 86400:
        ago = f"{secs // 3600} h {secs % 3600 // 60} min ago"
    else:
        ago = f"{secs // 86400} d ago"
    return f"{text} ({ago})"


class LedgerError(PermanentError):
    """A ledger refusal the service shows as is."""


class UnknownDeploy(LedgerError):
    def __init__(self, deploy_id: str) -> None:
        super().__init__(
            f"There is no deploy {deploy_id} in the ledger.",
            hint="`history` lists the recent ones.",
        )
        self.deploy_id = deploy_id


class StateConflict(LedgerError):
    """A conditional update found the deploy in another state (someone else moved it first)."""

    def __init__(self, deploy_id: str, state: DeployState, expected: tuple[DeployState, ...]) -> None:
        wanted = " or ".join(s.value for s in expected)
        super().__init__(f"Deploy {deploy_id} is {state.value}, not {wanted}; it was not changed.")
        self.deploy_id = deploy_id
        self.state = state


class Fenced(LedgerError):
    """This bot no longer owns the deploy (another took it over) or no longer holds its lease."""

    def __init__(self, deploy_id: str, why: str) -> None:
        super().__init__(
            f"This bot no longer owns deploy {deploy_id}: {why}.",
            hint="Another bot has taken it over; its thread tells how it ends.",
        )
        self.deploy_id = deploy_id
        self.why = why


class LockHeld(LedgerError):
    """The env is taken: by another deploy's lease or by a person's manual lock."""

    def __init__(
        self,
        message: str,
        *,
        env: str,
        kind: Literal["lease", "manual"],
        user: str | None,
        reason: str | None,
        since: datetime,
        deploy_id: str | None = None,
        holder: str | None = None,
        expires_at: datetime | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.env = env
        self.kind = kind
        self.user = user
        self.reason = reason
        self.since = since
        self.deploy_id = deploy_id
        self.holder = holder
        self.expires_at = expires_at

    @classmethod
    def for_lock(cls, lock: ManualLock, now: datetime) -> LockHeld:
        return cls(
            f"{lock.env} is locked by {who(lock.user)} since {when(lock.since, now)}: {lock.reason}",
            env=lock.env,
            kind="manual",
            user=lock.user,
            reason=lock.reason,
            since=lock.since,
            hint=f"Ask them, or run `unlock {lock.env}` once it is safe.",
        )

    @classmethod
    def for_lease(cls, lease: Lease, deploy: DeployRecord | None, now: datetime) -> LockHeld:
        if deploy is not None:
            what = deploy.kind.value
            if deploy.short or deploy.ref:
                what += f" of {deploy.short or deploy.ref}"
            doing = f"deploy {deploy.id} ({what}, requested by {who(deploy.requester)})"
            user: str | None = deploy.requester
            reason: str | None = what
        else:
            doing = f"deploy {lease.deploy_id}"
            user = reason = None
        return cls(
            f"{lease.env} is busy: {doing} has held it since {when(lease.acquired_at, now)}",
            env=lease.env,
            kind="lease",
            user=user,
            reason=reason,
            since=lease.acquired_at,
            deploy_id=lease.deploy_id,
            holder=lease.holder,
            expires_at=lease.expires_at,
            hint=(
                f"Wait for it to finish (`history {lease.env}` shows it); if its bot died, the lease "
                f"lapses at {when(lease.expires_at)} and can be taken over."
            ),
        )


class AlreadyDecided(LedgerError):
    def __init__(self, deploy_id: str, by: str, decision: DecisionKind, at: datetime) -> None:
        done = "approved" if decision == "approve" else "denied"
        super().__init__(f"Deploy {deploy_id} was already {done} by {who(by)} at {when(at)}.")
        self.deploy_id = deploy_id
        self.by = by
        self.decision: DecisionKind = decision
        self.at = at


class ApprovalExpired(LedgerError):
    def __init__(self, deploy_id: str, expires_at: datetime) -> None:
        super().__init__(
            f"The approval request for deploy {deploy_id} expired at {when(expires_at)}; nothing was deployed.",
            hint="Start the deploy again to ask for a fresh approval.",
        )
        self.deploy_id = deploy_id
        self.expires_at = expires_at


class ApprovalVoid(LedgerError):
    def __init__(self, deploy_id: str, *, approved: bool) -> None:
        since = "it was approved" if approved else "the approval was requested"
        super().__init__(
            f"The plan for deploy {deploy_id} changed since {since} (commit or image digests differ), "
            "so this approval no longer applies.",
            hint="Review the new plan and ask for approval again.",
        )
        self.deploy_id = deploy_id


class NoApproval(LedgerError):
    def __init__(self, deploy_id: str, state: ApprovalState | None) -> None:
        if state is None:
            msg = f"Deploy {deploy_id} has no approval request."
        else:
            msg = f"Deploy {deploy_id} is not approved (its approval is {state.value})."
        super().__init__(msg)
        self.deploy_id = deploy_id
        self.state = state


class SchemaTooNew(LedgerError):
    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"The ledger database is at schema version {found}, newer than this bot understands ({known}).",
            hint="Run the newer bot, or point DATABASE_URL at another database.",
        )
        self.found = found
        self.known = known
