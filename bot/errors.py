"""Errors named after what the runner should do: retry a transient fault, stop on a permanent one."""

from __future__ import annotations

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
