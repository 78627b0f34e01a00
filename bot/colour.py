"""Colour on a terminal: whether to use it (NO_COLOR, FORCE_COLOR, a TTY) and how to paint a word.

Apart from bot.terminal so that commands printing one table (`funnelcake status`, `history`) do not load the
live deploy display and the pipeline it draws."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TextIO

_SGR = {"red": "31", "green": "32", "yellow": "33", "blue": "34"}


def colour_enabled(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Colour only for a terminal: NO_COLOR (any non-empty value, no-color.org) turns it off, FORCE_COLOR
    (non-empty, not "0") turns it on even in a pipe; otherwise on exactly when the stream is a TTY."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    force = env.get("FORCE_COLOR")
    if force and force != "0":
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def paint(text: str, colour: str, *, enabled: bool) -> str:
    return f"\x1b[{_SGR[colour]}m{text}\x1b[0m" if enabled and colour in _SGR else text
