"""The ledger reporter: each step's start and end written into the audit trail as the run's owner.

Split out of bot/service.py; the service creates one per run."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from bot.errors import TransientError
from bot.ledger.models import (
    Fenced,
    StepState,
)
from bot.pipeline.engine import StepEvent
from bot.pipeline.vocab import SUMMARY_STEP, EventKind
from bot.runs import Run

if TYPE_CHECKING:
    from bot.service_core import ServiceCore

log = logging.getLogger("bot.service")  # the service's logger, as before the split


class LedgerReporter:
    """Writes each step's start and end into the audit trail, as the run's current owner (fenced).

    When the ledger is unreachable the events are kept, in order, and written once it answers again (the
    next event, or the run's final write, replays them): no step row is lost to an outage. A write refused
    because another bot owns the deploy now drops them: the successor writes its own."""

    def __init__(self, service: ServiceCore, run: Run) -> None:
        self.service = service
        self.run = run
        self.pending: list[StepEvent] = []

    async def emit(self, event: StepEvent) -> None:
        if event.step == SUMMARY_STEP:
            return  # the deploy record itself holds the outcome
        self.pending.append(event)
        with contextlib.suppress(TransientError):
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending; TransientError leaves the rest pending, Fenced drops it."""
        while self.pending:
            try:
                await self._write(self.pending[0])
            except Fenced:
                self.pending.clear()
                return
            except TransientError:
                if len(self.pending) == 1 or len(self.pending) % 20 == 0:
                    log.warning("ledger unreachable: %d step event(s) kept for later", len(self.pending))
                raise
            self.pending.pop(0)

    async def _write(self, event: StepEvent) -> None:
        ledger = self.service.deps.ledger
        fence = self.run.record.fence
        if event.kind is EventKind.STARTED:
            await ledger.record_step(
                self.run.record.id, event.step, state=StepState.RUNNING, fence=fence, at=event.at
            )
        elif event.kind in _STEP_STATES:
            detail = {"message": event.message, "elapsed": round(event.elapsed, 3), "attempts": event.attempt}
            detail.update({k: v for k, v in event.data.items() if _jsonable(v)})
            await ledger.finish_step(
                self.run.record.id,
                event.step,
                state=_STEP_STATES[event.kind],
                detail=detail,
                fence=fence,
                at=event.at,
            )


_STEP_STATES = {
    EventKind.DONE: StepState.OK,
    EventKind.SKIPPED: StepState.SKIPPED,
    EventKind.FAILED: StepState.FAILED,
    EventKind.ERRORED: StepState.ERRORED,
    EventKind.CANCELLED: StepState.ERRORED,
}


def _jsonable(value: object) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict, tuple))
