"""Plain typed data that flows between handlers, the service, the pipeline steps and the reporters."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bot.ledger.models import DeployKind
from bot.settings import MIGRATE_IMAGE, Service

__all__ = ["AMD64", "CommitInfo", "DeployKind", "EnvPlan", "ImagePlan", "Plan", "deployed_images", "plural"]

AMD64 = "linux/amd64"


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


@dataclass
class EnvPlan:
    env: str
    previous: dict[str, str] = field(default_factory=dict)  # service -> tag in the overlay before the deploy
    images: list[ImagePlan] = field(default_factory=list)
    run_migrations: bool = False
    locked_by: str | None = None


@dataclass
class Plan:
    """What a deploy would do; the dry run shows it and a production approval is bound to it."""

    deploy_id: str
    kind: DeployKind
    envs: list[str]
    commit: CommitInfo
    env_plans: dict[str, EnvPlan] = field(default_factory=dict)
    commits: list[CommitInfo] = field(default_factory=list)  # commits included, newest first
    migrations: list[str] = field(default_factory=list)  # migration files changed since the previous tag
    problems: list[str] = field(default_factory=list)  # preflight findings that block the deploy
    rebuild: bool = False  # every image is built from source, present or not

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
                locked_by=ep.get("locked_by"),
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
        )


def plural(n: int, word: str) -> str:
    """English count: `1 commit`, `2 commits`, `0 commits`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def deployed_images(migrate: bool) -> list[str]:
    images = [s.image for s in Service]
    return [*images, MIGRATE_IMAGE] if migrate else images
