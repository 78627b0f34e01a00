"""One deploy running in this bot: its task, its lease keeper, where it stands, and why it was stopped."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from bot.leases import LeaseKeeper
from bot.ledger import DeployRecord
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import StepEvent
from bot.pipeline.vocab import EventKind


@dataclass(frozen=True)
class Stop:
    """Why a run is being stopped: a person cancelled it, the bot is stopping (hand it over), or it lost
    its lease (another bot may own the deploy now)."""

    kind: Literal["cancel", "handover", "lost"]
    by: str | None = None
    why: str = ""


@dataclass
class Run:
    record: DeployRecord
    ctx: DeployContext
    task: asyncio.Task[DeployRecord] | None = None
    keeper: LeaseKeeper | None = None
    stop: Stop | None = None
    current: str | None = None  # the step running now
    done: list[str] = field(default_factory=list)  # steps finished ok or skipped, in order
    ending: bool = False  # its final state is being written and told: a stop now would only cut that off

    @property
    def where(self) -> str:
        return self.current or (self.done[-1] if self.done else "start")


class RunTracker:
    """A reporter that keeps the run's position: which step runs, which are done."""

    def __init__(self, run: Run) -> None:
        self.run = run

    async def emit(self, event: StepEvent) -> None:
        if event.kind is EventKind.STARTED:
            self.run.current = event.step
        elif event.kind in (EventKind.DONE, EventKind.SKIPPED):
            self.run.done.append(event.step)
            if self.run.current == event.step:
                self.run.current = None
