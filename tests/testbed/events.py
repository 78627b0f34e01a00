"""A reporter that keeps every step event of the deploy service, and the service built on the sandbox with it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from bot.pipeline.engine import StepEvent
from bot.pipeline.vocab import EventKind
from bot.service import DeployService
from bot.wiring import build_service
from tests.testbed.sandbox import Sandbox

Hook = Callable[[StepEvent], Awaitable[None]]


class Events:
    """A reporter that keeps every event; hooks let a test act at an exact point of a running deploy."""

    def __init__(self) -> None:
        self.events: list[StepEvent] = []
        self.hooks: list[Hook] = []

    async def emit(self, event: StepEvent) -> None:
        self.events.append(event)
        for hook in list(self.hooks):
            await hook(event)

    def of(self, run_id: str, step: str | None = None, kind: EventKind | None = None) -> list[StepEvent]:
        return [
            e
            for e in self.events
            if e.run_id == run_id and (step is None or e.step == step) and (kind is None or e.kind is kind)
        ]

    def steps(self, run_id: str, kind: EventKind) -> list[str]:
        return [e.step for e in self.of(run_id, kind=kind)]

    def one(self, run_id: str, step: str, kind: EventKind) -> StepEvent:
        found = self.of(run_id, step, kind)
        assert len(found) == 1, (step, kind, [(e.step, e.kind.value, e.message) for e in self.of(run_id)])
        return found[0]

    def summary(self, run_id: str) -> dict[str, Any]:
        """The data of the deploy's final event: what the last Slack reply is built from."""
        final = [e for e in self.of(run_id, "deploy") if e.kind in (EventKind.DONE, EventKind.FAILED)]
        assert final, [(e.step, e.kind.value) for e in self.of(run_id)]
        return dict(final[-1].data)


@pytest.fixture
async def service(sandbox: Sandbox) -> AsyncIterator[tuple[DeployService, Events]]:
    events = Events()
    assert sandbox.config is not None
    async with build_service(sandbox.settings(), sandbox.config, reporters=lambda record: [events]) as svc:
        yield svc, events
