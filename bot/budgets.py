"""The environments file's `timeouts`: every time budget, each wait checked to fit the step it runs in.

`steps` bounds each pipeline step; the waits inside a step, and the adapters' own budgets (git, Argo CD,
the registry client), are checked against it when the file is loaded. Re-exported by bot.settings.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Budgets(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepBudgets(_Budgets):
    """Each pipeline step's whole budget in seconds, its retries included: past it the step fails."""

    resolve: float = Field(default=180, gt=0)  # a first clone of the app repo on a slow link
    preflight: float = Field(default=90, gt=0)
    images: float = Field(default=2400, gt=0)  # promotion, and an in-cluster build when one is needed
    migrate: float = Field(default=900, gt=0)
    force_migrate: float = Field(default=900, gt=0, alias="force-migrate")
    gitops: float = Field(default=360, gt=0)  # the registry re-check, a fetch, the render checks, a push
    sync: float = Field(default=300, gt=0)
    rollout: float = Field(default=900, gt=0)
    verify: float = Field(default=120, gt=0)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def of(self, step: str) -> float | None:
        """The budget of the step called `step` (its pipeline name), or None for a step without one here."""
        value = getattr(self, step.replace("-", "_"), None)
        return float(value) if isinstance(value, int | float) else None


DEFAULT_STEP_BUDGETS = StepBudgets()  # each step's own `timeout`, when no environments file is at hand


class ArgoCDBudgets(_Budgets):
    """The phases of one Argo CD sync around `timeouts.sync` (the wait for the sync operation itself)."""

    refresh: float = Field(default=60, gt=0)  # the controller consumes the hard refresh
    settle: float = Field(default=15, gt=0)  # after the sync, its refresh reports the new revision


class RegistryBudgets(_Budgets):
    """The registry client's own budget: it retries 5xx, 429 and timeouts itself (the engine does not)."""

    request: float = Field(default=30, gt=0)  # each metadata request
    stream_idle: float = Field(default=60, gt=0)  # a blob stream with no byte read for this long
    retries: float = Field(default=60, gt=0)  # no new attempt of a failing request after this
    attempts: int = Field(default=4, ge=1)


# One registry call: its last attempt may start just before the retry budget ends, and take a request's time.
_REGISTRY_CALL = ("registry.retries", "registry.request")
# Each step's waits: every tuple is waits one after another (Timeouts fields by dotted path) within the step.
_NESTED: dict[str, list[tuple[str, ...]]] = {
    "resolve": [("git",)],
    "preflight": [_REGISTRY_CALL],
    "images": [("build",), _REGISTRY_CALL],
    "migrate": [("migrate",)],
    "force-migrate": [("migrate",)],
    # re-check the images, fetch, render the bumped overlays (side by side), push
    "gitops": [(*_REGISTRY_CALL, "git", "render", "git")],
    "sync": [("argocd.refresh", "sync")],
    "rollout": [("rollout",)],
    "verify": [("site",), ("relay",), ("api",)],
}


class Timeouts(_Budgets):
    """Seconds. `steps` bounds each pipeline step; the others bound one wait inside a step (or one call of
    an adapter), so each must fit inside its step's budget (checked when the file is loaded)."""

    rollout: float = Field(default=300, gt=0)
    sync: float = Field(default=180, gt=0)
    migrate: float = Field(default=600, gt=0)
    build: float = Field(default=1800, gt=0)
    approval: float = Field(default=1800, gt=0)
    site: float = Field(default=10, gt=0)
    relay: float = Field(default=10, gt=0)  # each relay check: NIP-11 answers, REQ gets EOSE
    api: float = Field(default=10, gt=0)  # the API's /health answers
    git: float = Field(default=120, gt=0)  # each clone/fetch/push: a big first clone, not a hung ssh
    render: float = Field(default=30, gt=0)  # each `kubectl kustomize` check of a bumped overlay
    argocd: ArgoCDBudgets = Field(default_factory=ArgoCDBudgets)
    registry: RegistryBudgets = Field(default_factory=RegistryBudgets)
    steps: StepBudgets = Field(default_factory=StepBudgets)

    def _at(self, path: str) -> float:
        node: Any = self
        for part in path.split("."):
            node = getattr(node, part.replace("-", "_"))
        return float(node)

    @model_validator(mode="after")
    def _inner_fits_outer(self) -> Timeouts:
        problems = []
        for step, inner in [(s, w) for s, ws in _NESTED.items() for w in ws]:
            wait, budget = sum(self._at(i) for i in inner), self._at(f"steps.{step}")
            if wait > budget:
                names = list(dict.fromkeys(inner))  # each once, in order: a fetch and a push are 2 * git
                waits = " + ".join(
                    f"{n} * timeouts.{i}" if (n := inner.count(i)) > 1 else f"timeouts.{i}" for i in names
                )
                problems.append(
                    f"{waits} ({wait:g} s) exceeds timeouts.steps.{step} ({budget:g} s), the whole budget of the "
                    f"{step} step {'they run' if inner[1:] else 'it runs'} in: lower "
                    f"{' or '.join(f'timeouts.{i}' for i in names)} or raise timeouts.steps.{step}"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


DEFAULT_TIMEOUTS = Timeouts()  # each adapter's own budget, when no environments file is at hand
