"""Typed payloads of step events: what a reporter reads from an event beyond its step, kind and message.

An event's `data` stays the generic JSON the ledger stores with the step; its `payload` is the typed view
of that JSON (`read_payload`), and a payload's `to_json` writes the very keys the ledger has always held,
so rows written before these types read back the same."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.pipeline.vocab import STOP_CANCEL, SUMMARY_STEP, EventKind, StepName

DETAILS_SHOWN = 6  # a diagnosis's details a reporter shows, at most
DETAIL_CHARS = 120  # and at most this much of each


def _str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _strs(v: object) -> tuple[str, ...]:
    return tuple(str(x) for x in v) if isinstance(v, list | tuple) else ()


def _map(v: object) -> dict[str, Any]:
    return {str(k): x for k, x in v.items()} if isinstance(v, Mapping) else {}


def _number(v: object) -> int | float | None:
    return v if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class ApprovalRequested:
    """The approval step waits for a second person: its plan (when it starts), expiry, and whether this
    is the reminder sent shortly before it expires."""

    expires_at: str = ""
    plan: Mapping[str, Any] | None = None
    reminder: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            **({"plan": dict(self.plan)} if self.plan is not None else {}),
            "expires_at": self.expires_at,
            **({"reminder": True} if self.reminder else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ApprovalRequested:
        plan = data.get("plan")
        return cls(
            str(data.get("expires_at") or ""),
            dict(plan) if isinstance(plan, Mapping) else None,
            bool(data.get("reminder")),
        )


@dataclass(frozen=True)
class Diagnosed:
    """A rollout failed and the diagnoser said why: what a thread shows, and the fixes it offers."""

    env: str
    cause: str = "unknown cause"
    evidence: str = ""
    fix: str = ""
    kind: str = "unknown"
    pod: str = ""
    deployment: str = ""
    promote_from: tuple[str, ...] = ()
    details: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "deployment": self.deployment,
            "diagnosis": {
                "cause": self.cause,
                "evidence": self.evidence,
                "fix": self.fix,
                "kind": self.kind,
                "pod": self.pod,
                "promote_from": list(self.promote_from),
                "details": dict(self.details),
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, env: str = "") -> Diagnosed:
        d = _map(data.get("diagnosis"))
        return cls(
            str(data.get("env") or env),
            str(d.get("cause", "unknown cause")),
            str(d.get("evidence", "")),
            str(d.get("fix", "")),
            str(d.get("kind", "unknown")),
            str(d.get("pod", "")),
            str(data.get("deployment") or ""),
            _strs(d.get("promote_from")),
            {k: str(v) for k, v in _map(d.get("details")).items()},  # absent from rows written before it
        )

    def detail_lines(self) -> list[str]:
        """The diagnoser's details (`reason: ImagePullBackOff`), the first few, each cut short."""
        lines = [f"{k}: {v}" for k, v in self.details.items() if v]
        shown = [line if len(line) <= DETAIL_CHARS else line[: DETAIL_CHARS - 1] + "…" for line in lines]
        return shown[:DETAILS_SHOWN]


@dataclass(frozen=True)
class DirtyMigration:
    """A migration failed half-way: the env's database is dirty at `version` until it is forced clean."""

    env: str
    version: int
    outcome: str = "dirty"
    log: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"env": self.env, "outcome": self.outcome, "log": self.log, "dirty_version": self.version}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DirtyMigration:
        return cls(
            str(data.get("env") or ""),
            int(data["dirty_version"]),
            str(data.get("outcome") or "dirty"),
            str(data.get("log") or ""),
        )


@dataclass(frozen=True)
class Resolved:
    """The ref resolved to a commit: its subject titles the thread."""

    subject: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject}


@dataclass(frozen=True)
class Verified:
    """verify's relay and API checks: one line per env (NIP-11 version, REQ→EOSE latency)."""

    endpoint_lines: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"endpoint_lines": dict(self.endpoint_lines)}


@dataclass(frozen=True)
class Stopped:
    """Why a step was stopped: a person's cancel, a hand-over to another bot, or a lost lease."""

    stop: str = STOP_CANCEL

    @property
    def by_a_person(self) -> bool:
        return self.stop == STOP_CANCEL

    def to_json(self) -> dict[str, Any]:
        return {"stop": self.stop}


@dataclass(frozen=True)
class ForcedClean:
    """A force-migrate's result: the version it marked clean and what `up` applied after it."""

    version: int | None = None
    applied: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeploySummary:
    """The final reply's facts: duration, images with digests, the Argo CD revision, where it stopped."""

    state: str = ""
    deploy_kind: str = "deploy"
    envs: tuple[str, ...] = ()
    short: str | None = None
    seconds: int | float | None = None
    images: Mapping[str, str | None] = field(default_factory=dict)
    revision: str | None = None
    endpoints: Mapping[str, str] = field(default_factory=dict)
    failed_step: str | None = None
    hint: str | None = None
    failure: Mapping[str, Any] = field(default_factory=dict)
    force: ForcedClean | None = None
    rollback_to: Mapping[str, str | None] = field(default_factory=dict)
    # refused only for want of the requester's yes to moving back: the thread offers that second yes
    move_back: tuple[str, ...] = ()
    pushed: bool | None = None  # told by a cancel: whether the overlays reached the GitOps remote

    def to_json(self) -> dict[str, Any]:
        force = self.force
        return {
            "state": self.state,
            "deploy_kind": self.deploy_kind,
            "envs": list(self.envs),
            "short": self.short,
            "seconds": self.seconds,
            "images": dict(self.images),
            "revision": self.revision,
            "endpoints": dict(self.endpoints),
            "failed_step": self.failed_step,
            "hint": self.hint,
            "failure": dict(self.failure),
            "force": {"version": force.version, "applied": list(force.applied)} if force else None,
            "rollback_to": dict(self.rollback_to),
            "move_back": list(self.move_back),
            **({"pushed": self.pushed} if self.pushed is not None else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeploySummary:
        force = data.get("force")
        version = force.get("version") if isinstance(force, Mapping) else None
        return cls(
            state=str(data.get("state") or ""),
            deploy_kind=str(data.get("deploy_kind") or "deploy"),
            envs=_strs(data.get("envs")),
            short=_str(data.get("short")),
            seconds=_number(data.get("seconds")),
            images={k: _str(v) for k, v in _map(data.get("images")).items()},
            revision=_str(data.get("revision")),
            endpoints={k: str(v) for k, v in _map(data.get("endpoints")).items()},
            failed_step=_str(data.get("failed_step")),
            hint=_str(data.get("hint")),
            failure=_map(data.get("failure")),
            force=ForcedClean(version if isinstance(version, int) else None, _strs(force.get("applied")))
            if isinstance(force, Mapping)
            else None,
            rollback_to={k: _str(v) for k, v in _map(data.get("rollback_to")).items()},
            move_back=_strs(data.get("move_back")),
            pushed=bool(data["pushed"]) if data.get("pushed") is not None else None,
        )


Payload = ApprovalRequested | Diagnosed | DirtyMigration | Resolved | Verified | Stopped | DeploySummary


def read_payload(step: str, kind: EventKind, data: Mapping[str, Any]) -> Payload | None:
    """The typed view of an event's data, or None when it carries none a reporter reads."""
    if step == SUMMARY_STEP:
        return DeploySummary.from_json(data)
    if kind is EventKind.CANCELLED:
        return Stopped(str(data.get("stop", STOP_CANCEL)))
    if step == StepName.APPROVAL and kind in (EventKind.STARTED, EventKind.PROGRESS) and "expires_at" in data:
        return ApprovalRequested.from_json(data)
    if kind in (EventKind.FAILED, EventKind.ERRORED) and "diagnosis" in data:
        return Diagnosed.from_json(data)
    if step == StepName.MIGRATE and isinstance(data.get("dirty_version"), int):
        return DirtyMigration.from_json(data)
    if step == StepName.RESOLVE and kind is EventKind.DONE:
        return Resolved(str(data.get("subject") or ""))
    if step == StepName.VERIFY and isinstance(data.get("endpoint_lines"), Mapping):
        return Verified({str(k): str(v) for k, v in data["endpoint_lines"].items()})
    return None
