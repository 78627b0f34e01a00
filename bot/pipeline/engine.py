"""The pipeline engine: runs small steps in order, owns their time budgets and retries, streams events.

A step only says what happened: it returns (ok), raises PermanentError (the check said no) or
TransientError (a system was unreachable). The engine decides what that means: transient faults are
retried with backoff inside the step's time budget, except those an adapter already retried itself (the
registry client's, `Retry.not_again`): one layer retries each system. A permanent one, or an exhausted
budget, stops the pipeline. Cancellation is a normal path: it is reported, and steps release what they hold in `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from bot.errors import BotError, PermanentError, TransientError
from bot.logs import redact, redact_json, step_context
from bot.pipeline.events import Payload, Stopped, read_payload
from bot.pipeline.vocab import (
    STOP_CANCEL,
    STOPPED,
    EventKind,
)

log = logging.getLogger(__name__)

__all__ = [
    "Pipeline",
    "PipelineResult",
    "Reporter",
    "Retry",
    "Skip",
    "Step",
    "StepEvent",
    "StepOutcome",
    "StepProgress",
    "StepResult",
    "stopped_by_a_person",
]

C = TypeVar("C")


def stopped_by_a_person(event: StepEvent) -> bool:
    """A cancelled step that ends the deploy here (not a hand-over or a lost lease, which go on elsewhere)."""
    return (
        event.kind is EventKind.CANCELLED and isinstance(event.payload, Stopped) and event.payload.by_a_person
    )


FINAL_KINDS = frozenset(
    {EventKind.DONE, EventKind.SKIPPED, EventKind.FAILED, EventKind.ERRORED, EventKind.CANCELLED}
)


@dataclass(frozen=True)
class StepEvent:
    """What reporters (Slack thread, terminal, ledger, metrics) see. `data` is the step's output as the
    ledger stores it; `payload` is its typed view (bot.pipeline.events), read from `data` when not given.
    A given payload's JSON is merged into `data`, so the two always agree."""

    run_id: str
    step: str
    kind: EventKind
    message: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)
    index: int = 0
    total: int = 0
    attempt: int = 1
    elapsed: float = 0.0
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    payload: Payload | None = None

    def __post_init__(self) -> None:
        if self.payload is None:
            object.__setattr__(self, "payload", read_payload(self.step, self.kind, self.data))
        else:
            object.__setattr__(self, "data", {**self.data, **self.payload.to_json()})

    @property
    def hint(self) -> str | None:
        """What to do next, when a step failed with one (a BotError's hint, kept in `data` for the ledger)."""
        hint = self.data.get("hint")
        return hint if isinstance(hint, str) else None


class Reporter(Protocol):
    async def emit(self, event: StepEvent) -> None: ...


class StepOutcome(StrEnum):
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"  # permanent: the check said no
    ERRORED = "errored"  # transient faults outlasted the retries or the time budget
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class StepResult:
    step: str
    outcome: StepOutcome
    message: str = ""
    hint: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    started: float = 0.0
    elapsed: float = 0.0
    attempts: int = 1


class Skip(Exception):
    """Raised by a step that has nothing to do (e.g. no migrations changed); the pipeline goes on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


StepProgress = Callable[[str, Mapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Retry:
    """Backoff for transient faults; the step's timeout bounds the whole thing.

    One layer retries each system: a fault of a type in `not_again` comes from an adapter that already
    retried it with its own backoff (the registry client), so the step fails with it at once."""

    attempts: int = 5
    wait_initial: float = 0.5
    wait_max: float = 10.0
    wait_jitter: float = 0.5
    not_again: tuple[type[TransientError], ...] = ()


def _details(e: BotError) -> dict[str, Any]:
    return {**e.data, **({"hint": e.hint} if e.hint else {})}


def _verdict(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception that decides a fanned-out step: a permanent error wins over a transient one."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(group)
    for kind in (PermanentError, Skip, TransientError, BotError):
        for e in leaves:
            if isinstance(e, kind):
                return e
    return next((e for e in leaves if not isinstance(e, asyncio.CancelledError)), leaves[0])


def _retry_hook(retry: Retry) -> Callable[[Exception], bool | float]:
    """Retry transient faults only, not those an adapter already retried; honour a delay the remote asked
    for (429 Retry-After)."""

    def hook(exc: Exception) -> bool | float:
        if isinstance(exc, TransientError) and not isinstance(exc, retry.not_again):
            return exc.delay if exc.delay is not None else True
        return False

    return hook


class Step(Generic[C]):
    """One unit of the pipeline. Subclasses set `name` and `timeout` and implement `run`."""

    name: str = "step"
    timeout: float = 60.0
    retry: Retry = Retry()

    async def run(self, ctx: C, progress: StepProgress) -> Mapping[str, Any] | None:
        raise NotImplementedError


@dataclass
class PipelineResult:
    run_id: str
    results: list[StepResult]

    @property
    def ok(self) -> bool:
        return all(r.outcome in (StepOutcome.OK, StepOutcome.SKIPPED) for r in self.results)

    @property
    def failed(self) -> StepResult | None:
        return next((r for r in self.results if r.outcome not in (StepOutcome.OK, StepOutcome.SKIPPED)), None)


class Pipeline(Generic[C]):
    """Runs `steps` in order; `budgets` (the environments file's `timeouts.steps`) overrides a step's own
    `timeout` by its name."""

    def __init__(
        self,
        run_id: str,
        steps: Sequence[Step[C]],
        reporters: Sequence[Reporter],
        *,
        budgets: Callable[[str], float | None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.steps = list(steps)
        self.reporters = list(reporters)
        self._budgets = budgets

    def budget(self, step: Step[C]) -> float:
        found = self._budgets(step.name) if self._budgets is not None else None
        return found if found is not None else step.timeout

    async def _emit(self, event: StepEvent) -> None:
        # Every reporter (Slack, the ledger, a terminal) gets the event scrubbed: a step message may quote
        # a remote's error text, and that can carry a credential.
        # The payload is read again from the scrubbed data, so it carries no credential either.
        event = replace(
            event, message=redact(event.message), data=redact_json(dict(event.data)), payload=None
        )
        # A reporter that breaks (Slack down) must not break the deploy; it is logged and skipped.
        for reporter in self.reporters:
            try:
                await reporter.emit(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reporter %s failed on %s/%s", type(reporter).__name__, event.step, event.kind)

    async def run(self, ctx: C) -> PipelineResult:
        results: list[StepResult] = []
        total = len(self.steps)
        for index, step in enumerate(self.steps, start=1):
            result = await self.run_step(step, ctx, index=index, total=total)
            results.append(result)
            if result.outcome not in (StepOutcome.OK, StepOutcome.SKIPPED):
                break
        return PipelineResult(self.run_id, results)

    async def run_step(self, step: Step[C], ctx: C, *, index: int = 1, total: int = 1) -> StepResult:
        with step_context(step.name):  # every line the step logs says which step it is
            return await self._run_step(step, ctx, index=index, total=total)

    async def _run_step(self, step: Step[C], ctx: C, *, index: int, total: int) -> StepResult:
        started = time.monotonic()
        attempt = 0
        budget = self.budget(step)

        def event(kind: EventKind, message: str = "", data: Mapping[str, Any] | None = None) -> StepEvent:
            return StepEvent(
                self.run_id,
                step.name,
                kind,
                message,
                dict(data or {}),
                index=index,
                total=total,
                attempt=max(attempt, 1),
                elapsed=time.monotonic() - started,
            )

        async def progress(message: str, data: Mapping[str, Any] | None = None) -> None:
            await self._emit(event(EventKind.PROGRESS, message, data))

        def result(
            outcome: StepOutcome, message: str, hint: str | None = None, data: Any = None
        ) -> StepResult:
            return StepResult(
                step.name,
                outcome,
                message,
                hint,
                dict(data or {}),
                started=started,
                elapsed=time.monotonic() - started,
                attempts=max(attempt, 1),
            )

        # Imported on the first step run: the terminal reporter imports this module, and `funnelcake history`
        # (which runs no step) need not load stamina and tenacity (~8 ms) on the way.
        import stamina  # noqa: PLC0415

        await self._emit(event(EventKind.STARTED))
        try:
            async with asyncio.timeout(budget):
                async for retrying in stamina.retry_context(
                    on=_retry_hook(step.retry),
                    attempts=step.retry.attempts,
                    timeout=None,  # the step's own budget (asyncio.timeout above) bounds the retries
                    wait_initial=step.retry.wait_initial,
                    wait_max=step.retry.wait_max,
                    wait_jitter=step.retry.wait_jitter,
                ):
                    with retrying:
                        attempt = retrying.num
                        if attempt > 1:
                            await self._emit(
                                event(EventKind.RETRYING, f"attempt {attempt}/{step.retry.attempts}")
                            )
                        try:
                            data = await step.run(ctx, progress)
                        except BaseExceptionGroup as group:
                            # Steps fan out with TaskGroups; the runner needs the verdict, not the group.
                            raise _verdict(group) from None
        except Skip as s:
            res = result(StepOutcome.SKIPPED, s.reason)
            await self._emit(event(EventKind.SKIPPED, s.reason))
            return res
        except PermanentError as e:
            res = result(StepOutcome.FAILED, e.message, e.hint, _details(e))
            await self._emit(event(EventKind.FAILED, e.message, _details(e)))
            return res
        except TransientError as e:
            msg = f"{e.message} (gave up after {attempt} attempt{'s' if attempt != 1 else ''})"
            if isinstance(e, step.retry.not_again):
                msg = e.message  # its adapter's hint says how often it tried
            res = result(StepOutcome.ERRORED, msg, e.hint, _details(e))
            await self._emit(event(EventKind.ERRORED, msg, _details(e)))
            return res
        except TimeoutError:
            msg = f"{step.name} did not finish within {budget:g}s"
            res = result(StepOutcome.ERRORED, msg, "Check the thread for the last progress, then retry.")
            await self._emit(event(EventKind.ERRORED, msg))
            return res
        except asyncio.CancelledError as e:
            # Whoever stopped the run says why in the cancel message (`task.cancel(STOP_HANDOVER)`): a person's
            # cancel, a hand-over to another bot, a lost lease. A bare cancel is a person's (or a shutdown's).
            why = e.args[0] if e.args and e.args[0] in STOPPED else STOP_CANCEL
            await asyncio.shield(self._emit(event(EventKind.CANCELLED, STOPPED[why], {"stop": why})))
            raise
        except BotError as e:
            res = result(StepOutcome.FAILED, e.message, e.hint, _details(e))
            await self._emit(event(EventKind.FAILED, e.message, _details(e)))
            return res
        except Exception as e:
            # A bug, not a verdict: say so plainly, keep the traceback in the logs only.
            log.exception("step %s crashed", step.name)
            msg = f"internal error in {step.name}: {type(e).__name__}"
            res = result(StepOutcome.ERRORED, msg, "This is a bot bug; the logs have the details.")
            await self._emit(event(EventKind.ERRORED, msg))
            return res
        res = result(StepOutcome.OK, "", data=data)
        await self._emit(event(EventKind.DONE, "", data))
        return res
