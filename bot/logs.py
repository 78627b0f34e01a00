"""Logging set-up: JSON lines in a container, readable text in a terminal, the deploy id on every line, secrets redacted.

The JSON lines use the field names GKE's logging agent maps onto a Cloud Logging entry: `severity`,
`message`, `time`, and `logging.googleapis.com/labels` for the deploy id, its env(s) and the running step
(set for a block of code with `deploy_context` and `step_context`, or per line with `extra=`), so a
deploy's lines can be filtered with `labels.deploy_id="d-7k2m"` in the Logs Explorer.

Redaction happens where each record is made (a wrapped log record factory, with a handler filter as a
second net), before any handler or formatter sees it: the message is rendered with its arguments, the
exception and stack text are rendered too, and all of it is scrubbed of the secret values
registered with `register_secret` (the Slack tokens, the signing secret, the git token, ClickHouse
credentials) and of anything token-shaped (Slack, GitHub and Google tokens, Bearer/Basic credentials,
the user:password in a URL, credentials in a DSN's query string such as ClickHouse's
`?username=…&password=…`, `password: …` pairs, private keys). The scrubbed text replaces the record's
message, arguments and exception, so no handler, ours or a library's, ever sees the raw values.

The same `redact` (and `redact_json` for Block Kit payloads) cleans what the bot sends elsewhere: Slack
messages, git commit messages, and the migrate Job's log before it is parsed, stored or posted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Literal, TypeVar
from urllib.parse import quote, quote_plus, urlsplit

from pydantic import BaseModel, SecretStr

from bot.mrkdwn import escape as slack_escape

LogFormat = Literal["auto", "json", "text"]
T = TypeVar("T")
REDACTED: Final = "[REDACTED]"
# A shorter "secret" would shred ordinary words out of every line; no real credential is this short.
MIN_SECRET_LENGTH: Final = 4

deploy_id_var: ContextVar[str | None] = ContextVar("deploy_id", default=None)
env_var: ContextVar[str | None] = ContextVar("env", default=None)
step_var: ContextVar[str | None] = ContextVar("step", default=None)
# Where GKE's agent looks for an entry's labels in a JSON line; values must be strings.
LABELS_KEY: Final = "logging.googleapis.com/labels"
LABEL_FIELDS: Final = ("deploy_id", "env", "step")

_TOKEN_PATTERNS: Final = [
    # Slack: bot, user, app-level, refresh and config tokens
    re.compile(r"\bxox[a-z]-[A-Za-z0-9-]{6,}"),
    re.compile(r"\bxox[a-z]\.[A-Za-z0-9.-]{6,}"),
    re.compile(r"\bxapp-[A-Za-z0-9-]{6,}"),
    # GitHub: classic, OAuth, user-to-server, server-to-server, refresh; fine-grained
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{16,}"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{16,}"),
    # Google OAuth access tokens (Artifact Registry, GKE)
    re.compile(r"\bya29\.[A-Za-z0-9._-]{8,}"),
    # PEM private keys, whole
    re.compile(
        r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)", re.DOTALL
    ),
]
# The credential after a scheme keyword, a URL's scheme or a key; the keyword stays so the line still reads.
_KEEP_PREFIX_PATTERNS: Final = [
    re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(\bbasic\s+)[A-Za-z0-9+/=]{8,}"),
    # The whole userinfo of `scheme://user:password@host` (a DSN's user is half the credential). The
    # password may hold a raw `@`: everything up to the last `@` before the host goes.
    re.compile(
        r"""(?i)(\b[a-z][a-z0-9+.-]*://)[^\s/?#"'<>@:]*:[^\s/?#"'<>]*(?=@[^\s/?#"'<>@]*(?:[/?#\s"'<>]|$))"""
    ),
    # Credentials in a query string, as golang-migrate's ClickHouse DSN carries them
    # (`tcp://host:9000?username=…&password=…`), and signed-URL signatures.
    re.compile(
        r"(?i)([?&;](?:user(?:name)?|password|passwd|pwd|pass|secret|token|access_token|api[_-]?key|key|"
        r"ticket|sig|signature|x-amz-signature|x-goog-signature)=)(?!\[REDACTED\])[^&\s\"'#<>]+"
    ),
    # `password=…`, `CLICKHOUSE_PASSWORD: …`, `"token": "…"`: an underscore may precede the key.
    re.compile(
        r"""(?i)((?<![a-z0-9])(?:password|passwd|pwd|secret|token|api[_-]?key|client[_-]?secret)["']?\s*[=:]\s*["']?)"""
        r"""(?!\[REDACTED\])[^\s"',;&}]{3,}"""
    ),
]

_STANDARD_ATTRS: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "deploy_id", "taskName"}
)


class _Secrets:
    """The registered secret values, matched longest first so a secret containing another is removed whole."""

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        # As written, URL-encoded (a DSN, a form body) and HTML-escaped (Slack's mrkdwn escaping of &<>).
        forms = {value, quote(value, safe=""), quote_plus(value), slack_escape(value)}
        with self._lock:
            before = len(self._values)
            self._values |= {f for f in forms if len(f) >= MIN_SECRET_LENGTH}
            if len(self._values) != before:
                ordered = sorted(self._values, key=len, reverse=True)
                self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = None

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(REDACTED, text) if pattern is not None else text


_secrets = _Secrets()


def register_secret(value: str | SecretStr | None) -> None:
    """Never let `value` reach a log line. Values shorter than MIN_SECRET_LENGTH are ignored."""
    if value is None:
        return
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if raw:
        _secrets.add(raw)


def register_secrets_from(model: BaseModel) -> int:
    """Register every SecretStr field of a settings object; returns how many were set."""
    count = 0
    for name in type(model).model_fields:
        v = getattr(model, name)
        if isinstance(v, SecretStr) and v.get_secret_value():
            register_secret(v)
            count += 1
    return count


def forget_secrets() -> None:
    """Drop every registered value (tests; a process keeps its secrets for its lifetime)."""
    _secrets.clear()


def redact(text: str) -> str:
    """The text without registered secrets and token-shaped strings."""
    text = _secrets.scrub(text)
    for p in _TOKEN_PATTERNS:
        text = p.sub(REDACTED, text)
    for p in _KEEP_PREFIX_PATTERNS:
        text = p.sub(lambda m: m.group(1) + REDACTED, text)
    return text


def redact_json(value: T) -> T:
    """A copy of a JSON-like value (dicts, lists, strings: a Block Kit payload) with every string redacted."""
    if isinstance(value, str):
        return redact(value)  # type: ignore[return-value]  # a str in, a str out
    if isinstance(value, Mapping):
        return {k: redact_json(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, list | tuple):
        return [redact_json(v) for v in value]  # type: ignore[return-value]
    return value


@contextlib.contextmanager
def deploy_context(deploy_id: str, envs: Iterable[str] = ()) -> Iterator[None]:
    """Tag every log line written inside the block (and in tasks and threads started from it) with the id
    and, if given, the deploy's envs (comma-separated when there are several)."""
    token = deploy_id_var.set(deploy_id)
    env_token = env_var.set(",".join(envs) or None)
    try:
        yield
    finally:
        env_var.reset(env_token)
        deploy_id_var.reset(token)


@contextlib.contextmanager
def step_context(step: str) -> Iterator[None]:
    """Tag every log line written inside the block with the pipeline step that runs."""
    token = step_var.set(step)
    try:
        yield
    finally:
        step_var.reset(token)


def scrub_record(record: logging.LogRecord) -> None:
    """Render the record's message, exception and stack, and replace them with their redacted text."""
    if getattr(record, "_scrubbed", False):
        return
    # Kept under a private name: logging refuses an `extra` that overwrites an attribute the record factory
    # set, and `extra={"deploy_id": ...}` must stay allowed. The formatters prefer an explicit one.
    if not hasattr(record, "_deploy_ctx"):
        record._deploy_ctx = deploy_id_var.get()
        record._env_ctx = env_var.get()
        record._step_ctx = step_var.get()
    try:
        message = record.getMessage()
    # An argument's __str__ may raise anything; left alone, logging would print msg and args raw to stderr.
    except Exception:  # noqa: BLE001
        message = f"(unformattable log message) {record.msg!s}"
    record.msg = redact(message)
    record.args = None
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    for key, value in list(vars(record).items()):
        if key not in _STANDARD_ATTRS and isinstance(value, str):
            setattr(record, key, redact(value))
    record._scrubbed = True


class RedactingFilter(logging.Filter):
    """Scrubs records that did not come from the record factory (e.g. built by makeLogRecord); never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


class _ScrubbingFactory:
    """Wraps the log record factory so a record is clean from birth, whatever handler sees it first."""

    def __init__(self, inner: Callable[..., logging.LogRecord]) -> None:
        self.inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.inner(*args, **kwargs)
        scrub_record(record)
        return record


def _deploy_id(record: logging.LogRecord) -> str | None:
    explicit = getattr(record, "deploy_id", None)
    return explicit if explicit is not None else getattr(record, "_deploy_ctx", None)


def _severity(levelno: int) -> str:
    """Cloud Logging's LogSeverity for a Python level (a custom level rounds down to the one below)."""
    for floor, name in ((50, "CRITICAL"), (40, "ERROR"), (30, "WARNING"), (20, "INFO"), (10, "DEBUG")):
        if levelno >= floor:
            return name
    return "DEFAULT"


def _labels(record: logging.LogRecord) -> dict[str, str]:
    """deploy_id, env and step: an explicit `extra=` wins over the context the line was written in."""
    found = {
        "deploy_id": _deploy_id(record),
        "env": getattr(record, "env", None) or getattr(record, "_env_ctx", None),
        "step": getattr(record, "step", None) or getattr(record, "_step_ctx", None),
    }
    return {k: str(v) for k, v in found.items() if v is not None and v != ""}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, in Cloud Logging's field names: time, severity, logger, message, the
    labels (deploy_id, env, step) under `logging.googleapis.com/labels`, then extras and the traceback
    as `stack_trace`, where Error Reporting looks for it."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "severity": _severity(record.levelno),
            "logger": record.name,
            "message": record.getMessage(),
        }
        labels = _labels(record)
        if labels:
            out[LABELS_KEY] = labels
        for key, value in _extras(record).items():
            if key not in LABEL_FIELDS:
                out.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["stack_trace"] = record.exc_text  # where Error Reporting looks first
        if record.stack_info:
            out["stack"] = record.stack_info
        # default=str: an extra that is not JSON (a Path, a dict of params) is still written, as text; the
        # whole line is scrubbed again because the filter only cleans extras that are strings.
        return redact(json.dumps(out, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    """`12:04:05.123 INFO  bot.service [d-7k2m] message key=value` for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s [%(deploy_id)s] %(message)s", "%H:%M:%S")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{super().formatTime(record, datefmt)}.{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "deploy_id", None) is None:
            record.deploy_id = _deploy_id(record) or "-"
        line = super().format(record)
        extras = _extras(record)
        if extras:
            head, sep, tail = line.partition("\n")
            line = head + " " + " ".join(f"{k}={v}" for k, v in extras.items()) + sep + tail
        return redact(line)


def _in_container() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) or Path("/.dockerenv").exists()


def resolve_format(fmt: LogFormat, stream: IO[str]) -> Literal["json", "text"]:
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        tty = bool(isatty()) if callable(isatty) else False
        return "text" if tty and not _in_container() else "json"
    if fmt not in ("json", "text"):
        raise ValueError(f"unknown log format {fmt!r}: use auto, json or text (LOG_FORMAT)")
    return fmt


def _level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    levels = logging.getLevelNamesMapping()
    name = level.strip().upper()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}: use DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)")
    return levels[name]


class _BotHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler setup_logging installed, so a second call replaces it instead of doubling lines."""


def register_settings_secrets(settings: BaseModel) -> None:
    """Every secret a process's settings hold, so no log line or message can carry it: the SecretStr
    fields, and the password in a PostgreSQL ledger's `database_url` (a URL, not a SecretStr)."""
    register_secrets_from(settings)
    url = getattr(settings, "database_url", None)
    if isinstance(url, str):
        with contextlib.suppress(ValueError):
            register_secret(urlsplit(url).password)


def file_logging(path: Path, level: str | int = "INFO") -> logging.Handler:
    """Add a handler writing text lines to `path`, redacted as every other log (OSError if it cannot open)."""
    numeric = _level(level)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(numeric)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > numeric:
        root.setLevel(numeric)
    _install_factory()
    logging.captureWarnings(True)
    return handler


def _install_factory() -> None:
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _ScrubbingFactory):
        logging.setLogRecordFactory(_ScrubbingFactory(factory))


def setup_logging(
    fmt: LogFormat = "auto", level: str | int = "INFO", *, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every logger's records to `stream` (stderr) through the redacting filter, in the chosen format."""
    out = stream if stream is not None else sys.stderr
    chosen = resolve_format(fmt, out)
    numeric = _level(level)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _BotHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _BotHandler(out)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    _install_factory()
    # A probe every few seconds would drown the deploy lines; access logs stay available at DEBUG.
    logging.getLogger("aiohttp.access").setLevel(max(numeric, logging.WARNING))
    logging.captureWarnings(True)
    return handler
