"""Plain typed data that flows between handlers, the service, the pipeline steps and the reporters."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from bot.settings import MIGRATE_IMAGE, Service

__all__ = [
    "AMD64",
    "BOT_USER",
    "CommitInfo",
    "DeployKind",
    "EnvPlan",
    "ImagePlan",
    "Plan",
    "ServiceMove",
    "deployed_images",
    "plural",
]

AMD64 = "linux/amd64"
# The user the bot's own locks are held by (the lock after a failed production deploy, which a rollback may pass).
BOT_USER = "funnelcake-bot"


class DeployKind(StrEnum):
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    MIGRATE = "migrate"
    FORCE_MIGRATE = "force-migrate"

    @property
    def changes_tags(self) -> bool:
        """Deploys and rollbacks move an env's overlay tag; migrations leave it alone."""
        return self in (DeployKind.DEPLOY, DeployKind.ROLLBACK)


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    short: str
    subject: str = ""
    author: str = ""


ImageAction = Literal["present", "promote", "build"]


@dataclass
class ImagePlan:
    """One image for one env: what exists in the env's own registry and what the images step must do."""

    env: str
    image: str
    tag: str
    action: ImageAction
    digest: str | None = None
    source_env: str | None = None
    platforms: tuple[str, ...] = ()
    note: str = ""


MoveKind = Literal["forward", "unchanged", "downgrade", "diverged", "unknown"]


@dataclass
class ServiceMove:
    """What one service of one env does: from the overlay's tag to the deploy's commit.

    forward: the commit adds `ahead`; downgrade: it drops `behind` (and `kept_migrations`, migrations of
    those commits that stay applied: nothing reverts them); diverged: both; unknown: the app repo does not
    know the overlay's tag; unchanged: the service already runs the commit."""

    service: str
    previous: str
    kind: MoveKind
    ahead: list[CommitInfo] = field(default_factory=list)
    behind: list[CommitInfo] = field(default_factory=list)
    kept_migrations: list[str] = field(default_factory=list)

    @property
    def goes_back(self) -> bool:
        return self.kind in ("downgrade", "diverged")

    def describe(self, target: str) -> str:
        """One plain line: `api 0ce255e → aaaf1b8: 2 commits ahead`, `relay aaaf1b8: unchanged`, …"""
        if self.kind == "unchanged":
            return f"{self.service} {self.previous}: unchanged"
        head = f"{self.service} {self.previous or '(none)'} → {target}"
        if self.kind == "unknown":
            return f"{head}: the deployed tag is not a commit of the app repo"
        if self.kind == "forward":
            return f"{head}: {plural(len(self.ahead), 'commit')} ahead"
        text = f"{head}: DOWNGRADE, moves back {plural(len(self.behind), 'commit')}"
        if self.kind == "diverged":
            text += f" and adds {plural(len(self.ahead), 'other commit')}"
        if self.kept_migrations:
            names = ", ".join(m.rsplit("/", 1)[-1] for m in self.kept_migrations)
            text += f"; migrations NOT reverted (they stay applied): {names}"
        return text

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceMove:
        return cls(
            service=data["service"],
            previous=data["previous"],
            kind=data["kind"],
            ahead=[CommitInfo(**c) for c in data.get("ahead", [])],
            behind=[CommitInfo(**c) for c in data.get("behind", [])],
            kept_migrations=list(data.get("kept_migrations", [])),
        )


@dataclass
class EnvPlan:
    env: str
    previous: dict[str, str] = field(default_factory=dict)  # service -> tag in the overlay before the deploy
    images: list[ImagePlan] = field(default_factory=list)
    run_migrations: bool = False
    moves: list[ServiceMove] = field(default_factory=list)

    def going_back(self) -> list[ServiceMove]:
        return [m for m in self.moves if m.goes_back]


@dataclass
class Plan:
    """What a deploy would do; the dry run shows it and a production approval is bound to it."""

    deploy_id: str
    kind: DeployKind
    envs: list[str]
    commit: CommitInfo
    env_plans: dict[str, EnvPlan] = field(default_factory=dict)
    commits: list[CommitInfo] = field(default_factory=list)  # commits included, newest first
    migrations: list[str] = field(
        default_factory=list
    )  # up-migrations added or changed since the previous tag
    problems: list[str] = field(default_factory=list)  # preflight findings that block the deploy
    rebuild: bool = False  # every image is built from source, present or not
    warnings: list[str] = field(default_factory=list)  # e.g. this commit failed in another env
    allow_downgrade: bool = False  # the requester confirmed moving an env back (kept in the ledger's plan)
    override_reason: str | None = None  # an admin's reason for going past a promotion gate
    overridden: list[str] = field(default_factory=list)  # the gates that reason went past

    def images(self) -> list[ImagePlan]:
        return [img for ep in self.env_plans.values() for img in ep.images]

    def binding(self) -> str:
        """Hash of the commit and every image digest: an approval is void if any of them changes."""
        items = sorted((i.env, i.image, i.tag, i.digest or f"to-{i.action}") for i in self.images())
        raw = json.dumps({"sha": self.commit.sha, "envs": sorted(self.envs), "images": items})
        return hashlib.sha256(raw.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        env_plans = {
            name: EnvPlan(
                env=ep["env"],
                previous=dict(ep["previous"]),
                images=[ImagePlan(**{**i, "platforms": tuple(i["platforms"])}) for i in ep["images"]],
                run_migrations=ep["run_migrations"],
                moves=[ServiceMove.from_json(m) for m in ep.get("moves", [])],
            )
            for name, ep in data["env_plans"].items()
        }
        return cls(
            deploy_id=data["deploy_id"],
            kind=DeployKind(data["kind"]),
            envs=list(data["envs"]),
            commit=CommitInfo(**data["commit"]),
            env_plans=env_plans,
            commits=[CommitInfo(**c) for c in data["commits"]],
            migrations=list(data["migrations"]),
            problems=list(data["problems"]),
            rebuild=bool(data.get("rebuild", False)),
            warnings=list(data.get("warnings", [])),
            allow_downgrade=bool(data.get("allow_downgrade", False)),
            override_reason=data.get("override_reason"),
            overridden=list(data.get("overridden", [])),
        )


def plural(n: int, word: str) -> str:
    """English count: `1 commit`, `2 commits`, `0 commits`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def deployed_images(migrate: bool) -> list[str]:
    images = [s.image for s in Service]
    return [*images, MIGRATE_IMAGE] if migrate else images
