"""The terminal reporter: a deploy's step list, progress bar and elapsed time, redrawn live or as plain lines.

On a TTY the whole block is redrawn in place (and ticks once a second so the clock moves while a step
waits on a rollout); anywhere else (a pipe, CI logs) every event becomes one plain line with no escape
codes, so the output stays greppable. Colour follows the usual conventions (see `colour_enabled`). Steps the reporter was not told about (`approval`, `lock`) are
inserted where they happen; the service's closing `deploy` event is a summary, not a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TextIO

from bot.colour import colour_enabled, paint
from bot.pipeline.engine import StepEvent, stopped_by_a_person
from bot.pipeline.events import ApprovalRequested, DeploySummary, Diagnosed, Verified
from bot.pipeline.vocab import SUMMARY_STEP, EventKind

_FANCY = {"pending": "·", "running": "…", "done": "✓", "skipped": "\u2013", "failed": "✗", "retrying": "↻"}
_PLAIN = {"pending": ".", "running": "~", "done": "+", "skipped": "-", "failed": "x", "retrying": "r"}
_BAR_FULL, _BAR_EMPTY = "█", "░"
_STATE_OF = {
    EventKind.STARTED: "running",
    EventKind.PROGRESS: "running",
    EventKind.RETRYING: "retrying",
    EventKind.DONE: "done",
    EventKind.SKIPPED: "skipped",
    EventKind.FAILED: "failed",
    EventKind.ERRORED: "failed",
    EventKind.CANCELLED: "failed",
}
_FINISHED = ("done", "skipped", "failed")
_STATE_COLOUR = {"done": "green", "failed": "red", "retrying": "yellow", "running": "blue"}


@dataclass
class StepLine:
    name: str
    state: str = "pending"
    message: str = ""
    elapsed: float | None = None


@dataclass(frozen=True)
class Failure:
    step: str
    message: str
    hint: str | None


def _can_encode(stream: TextIO, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def clock_text(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _with_endpoint_lines(event: StepEvent) -> StepEvent:
    """verify's done line carries its relay and API checks per env (NIP-11 version, REQ→EOSE latency)."""
    checked = event.payload if event.kind is EventKind.DONE else None
    if event.message or not isinstance(checked, Verified) or not checked.endpoint_lines:
        return event
    return replace(event, message="; ".join(f"{env}: {text}" for env, text in checked.endpoint_lines.items()))


def diagnosis_lines(d: Diagnosed) -> list[str]:
    """A failed rollout's diagnosis, under its step: the cause, the fix, and the diagnoser's details."""
    lines = [f"diagnosis ({d.env}): {d.cause}"] if d.env else [f"diagnosis: {d.cause}"]
    if d.fix:
        lines.append(f"fix: {d.fix}")
    return lines + d.detail_lines()


class TerminalReporter:
    """A Reporter (emit(StepEvent)) for one run; use `async with` so the TTY clock is started and stopped."""

    def __init__(
        self,
        steps: Sequence[str],
        *,
        title: str = "",
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick: float = 1.0,
        width: int | None = None,
        colour: bool | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.title = title
        self.clock = clock
        self.tick = tick
        self.width = width
        self.colour = colour_enabled(self.stream) if colour is None else colour
        self.steps = [StepLine(name) for name in steps]
        self.started = clock()
        self.failure: Failure | None = None
        self.summary: DeploySummary | None = None
        self.approval: ApprovalRequested | None = None  # what the approval step last said it waits for
        self.diagnosis: Diagnosed | None = None  # a failed rollout's, shown under the steps
        self.cancelled = False
        fancy = _can_encode(self.stream, "".join(_FANCY.values()) + _BAR_FULL + _BAR_EMPTY)
        self.symbols = _FANCY if fancy else _PLAIN
        self.bar_chars = (_BAR_FULL, _BAR_EMPTY) if fancy else ("#", "-")
        self._drawn = 0  # lines of the last frame, for the redraw in place
        self._ticker: asyncio.Task[None] | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    async def __aenter__(self) -> TerminalReporter:
        self.started = self.clock()
        if self.tty:
            self._draw()
            self._ticker = asyncio.create_task(self._tick(), name="terminal-reporter-clock")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self.tty:
            self._draw()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self._draw()

    # ---- the Reporter protocol ----------------------------------------------------------------------

    async def emit(self, event: StepEvent) -> None:
        if event.step == SUMMARY_STEP:
            event = self._summarise(event)
            if event.step == SUMMARY_STEP:
                return
        event = _with_endpoint_lines(event)
        line = self._line(event.step)
        state = _STATE_OF[event.kind]
        if isinstance(event.payload, ApprovalRequested):
            self.approval = event.payload
        if isinstance(event.payload, Diagnosed):
            self.diagnosis = event.payload
        if event.kind in (EventKind.STARTED, EventKind.RETRYING) or event.message:
            line.message = event.message
        if event.kind is EventKind.STARTED:
            line.elapsed = None
        if state in _FINISHED:
            line.elapsed = event.elapsed
        line.state = state
        if stopped_by_a_person(event):
            self.cancelled = True
        if event.kind in (EventKind.FAILED, EventKind.ERRORED):
            self.failure = Failure(event.step, event.message, event.hint)
        if self.tty:
            self._draw()
        else:
            self._plain(event, line)

    def _summarise(self, event: StepEvent) -> StepEvent:
        """Keep the run's summary; a refusal before any step ran (a lock) comes back as that step's failure."""
        summary = event.payload if isinstance(event.payload, DeploySummary) else DeploySummary()
        self.summary = summary
        hint = summary.hint
        failure = self.failure
        if event.kind is not EventKind.FAILED:
            return event
        if failure is not None:
            if failure.hint is None and hint is not None:
                self.failure = Failure(failure.step, failure.message, hint)
            return event
        step = summary.failed_step
        if not step or step == SUMMARY_STEP:
            self.failure = Failure(SUMMARY_STEP, event.message, hint)
            return event
        return replace(event, step=step)

    def _line(self, name: str) -> StepLine:
        for line in self.steps:
            if line.name == name:
                return line
        # An unplanned step goes after the last one that started: `approval` after preflight, `lock` first.
        started = [i for i, s in enumerate(self.steps) if s.state != "pending"]
        at = started[-1] + 1 if started else 0
        line = StepLine(name)
        self.steps.insert(at, line)
        return line

    # ---- rendering ------------------------------------------------------------------------------------

    @property
    def finished(self) -> int:
        return sum(1 for s in self.steps if s.state in _FINISHED)

    def bar(self, width: int = 24) -> str:
        total = len(self.steps) or 1
        full = round(width * self.finished / total)
        return self.bar_chars[0] * full + self.bar_chars[1] * (width - full)

    def frame(self) -> list[str]:
        """The block a TTY shows: header with bar and clock, then one line per step."""
        elapsed = clock_text(self.clock() - self.started)
        head = f"{self.title}  " if self.title else ""
        lines = [f"{head}[{self.bar()}] {self.finished}/{len(self.steps)}  {elapsed}"]
        name_width = max((len(s.name) for s in self.steps), default=0)
        for s in self.steps:
            took = f"{s.elapsed:5.1f}s" if s.elapsed is not None else "      "
            symbol = paint(self.symbols[s.state], _STATE_COLOUR.get(s.state, ""), enabled=self.colour)
            text = f"  {symbol} {s.name:<{name_width}}  {took}"
            if s.message:
                text += f"  {s.message}"
            lines.append(text.rstrip())
        if self.diagnosis is not None:
            lines += [f"    {line}" for line in diagnosis_lines(self.diagnosis)]
        return lines

    def _fit(self, line: str) -> str:
        # A line wider than the terminal wraps and would break the cursor arithmetic of the redraw.
        width = self.width or shutil.get_terminal_size((100, 24)).columns
        flat = line.replace("\n", " ")
        return flat if len(flat) < width else flat[: max(width - 2, 1)] + "…"

    def _draw(self) -> None:
        lines = [self._fit(line) for line in self.frame()]
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F\x1b[J")  # to the first line of the last frame, clear below
        out.append("\n".join(lines) + "\n")
        self._drawn = len(lines)
        self._write("".join(out))

    def _plain(self, event: StepEvent, line: StepLine) -> None:
        stamp = f"[{self.clock() - self.started:6.1f}s]"
        count = f"{self.finished}/{len(self.steps)}"
        symbol = paint(self.symbols[line.state], _STATE_COLOUR.get(line.state, ""), enabled=self.colour)
        if event.kind is EventKind.STARTED:
            text = f"{stamp} {count} {symbol} {event.step} {event.message or 'started'}"
        elif event.kind is EventKind.PROGRESS:
            text = f"{stamp} {count}   {event.step}: {event.message}"
        elif event.kind is EventKind.RETRYING:
            text = f"{stamp} {count} {symbol} {event.step} retrying ({event.message})"
        else:
            verb = {
                EventKind.DONE: "done",
                EventKind.SKIPPED: "skipped",
                EventKind.FAILED: "failed",
                EventKind.ERRORED: "failed",
                EventKind.CANCELLED: "cancelled" if stopped_by_a_person(event) else "stopped",
            }[event.kind]
            text = f"{stamp} {count} {symbol} {event.step} {verb} in {event.elapsed:.1f}s"
            if event.message and event.message != verb:
                text += f": {event.message}"
        lines = (
            [text, *(f"    {d}" for d in diagnosis_lines(event.payload))]
            if isinstance(event.payload, Diagnosed)
            else [text]
        )
        self._write("".join(line.replace("\n", " ") + "\n" for line in lines))

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
