"""Errors named after what the runner should do: retry a transient fault, stop on a permanent one."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any


class BotError(Exception):
    """Base class: every error the bot raises carries a message fit for a person."""

    def __init__(
        self, message: str, *, hint: str | None = None, data: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        # structured facts for reporters (a diagnosis, a dirty migration version), never secrets
        self.data: Mapping[str, Any] = data or {}

    def __str__(self) -> str:
        return f"{self.message} {self.hint}" if self.hint else self.message


class PermanentError(BotError):
    """The check said no (tag missing, access denied, dirty database): retrying will not help."""


class TransientError(BotError):
    """A system was unreachable or busy (timeout, 5xx, 429): the runner may retry with backoff."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        delay: float | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, hint=hint, data=data)
        self.delay = delay


class ConfigError(BotError):
    """The environments file or the settings are invalid; the message lists every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"Invalid configuration in {source} ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}):\n{lines}",
            hint="Fix the file and restart the bot.",
        )

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}"


class LedgerUnavailable(TransientError):
    """The deploy ledger did not answer, or could not take a write for now (down, busy, disk full).

    `message` names the ledger (backend, host:port/database or the SQLite file; never a password) and what
    happened; `reason` says the same in generic words for places anyone can read, like /readyz; `detail`
    is the driver's own first line, for the bot's log only.
    """

    def __init__(self, message: str, *, reason: str, hint: str | None = None, detail: str = "") -> None:
        super().__init__(message, hint=hint)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.message}: {self.hint}" if self.hint else self.message


class DatabaseUrlError(ConfigError):
    """DATABASE_URL names a ledger the bot cannot use: one sentence, the part that is wrong and what to do."""

    def __init__(self, problem: str, fix: str, *, reason: str = "misconfigured") -> None:
        BotError.__init__(self, f"DATABASE_URL: {problem}", hint=fix)
        self.source = "DATABASE_URL"
        self.problems = [problem]
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}"


def first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception a task group's callers want: its first one that is not a sibling's cancellation."""
    return next(
        (e for e in group.exceptions if not isinstance(e, asyncio.CancelledError)), group.exceptions[0]
    )
