"""The `funnelcake` terminal CLI: the same operations as Slack, for when Slack is down or for scripts."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from bot import commands
from bot.cli.dispatch import _dispatch
from bot.cli.parser import (
    COMPLETION_SHELLS,
    DESCRIPTION,
    DISTRIBUTION,
    EPILOG,
    EXIT_CANCELLED,
    EXIT_ENDED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    FINDING_SEVERITIES,
    FOLLOW_EVERY,
    LOG_FILE,
    PROG,
    ConfigUnreadable,
    LazyConfig,
    UsageError,
    build_parser,
    command_of,
    completion_script,
    version,
)
from bot.cli.render import history_json, record_json, render_history, render_plan, render_status, status_json
from bot.cli.session import Refused, Session, whoami
from bot.errors import BotError, ConfigError, LedgerUnavailable
from bot.logs import file_logging, register_settings_secrets
from bot.models import plural
from bot.settings import FunnelcakeConfig, Settings, env_problems, load_config

log = logging.getLogger("bot.cli")

# Split into parser, session, render and dispatch; these names are still imported from here.
__all__ = [
    "COMPLETION_SHELLS",
    "DESCRIPTION",
    "DISTRIBUTION",
    "EPILOG",
    "EXIT_CANCELLED",
    "EXIT_ENDED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "FINDING_SEVERITIES",
    "FOLLOW_EVERY",
    "LOG_FILE",
    "PROG",
    "Refused",
    "Session",
    "UsageError",
    "_setup_logging",
    "build_parser",
    "completion_script",
    "history_json",
    "main",
    "record_json",
    "render_history",
    "render_plan",
    "render_status",
    "run",
    "status_json",
    "version",
    "whoami",
]


def _config_check(config: FunnelcakeConfig, source: str) -> int:
    """The file is valid (a ConfigError listing every problem with its path was raised otherwise)."""
    print(f"{source}: valid, {plural(len(config.environments), 'environment')}")
    for env in config.environments:
        approval = "approval required" if env.approval_required else "no approval"
        print(
            f"{env.name}: {env.registry} · {env.kube_context} · migrations {env.migrations.mode} · {approval}"
        )
    return EXIT_OK


def _setup_logging(settings: Settings) -> tuple[logging.Handler, Path | None]:
    """Logs go to a file, never the terminal: the terminal gets one clear message, the file the traceback.
    The file is redacted like every other log: the settings' secrets never reach it."""
    register_settings_secrets(settings)
    path = settings.work_dir / LOG_FILE
    try:
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        return file_logging(path, settings.log_level), path
    except (OSError, ValueError):
        handler = logging.NullHandler()
        logging.getLogger().addHandler(handler)
        return handler, None


def _refuse_unconfirmable(args: argparse.Namespace, cmd: commands.Command) -> None:
    if isinstance(cmd, commands.Deploy) and not (cmd.dry_run or args.yes) and not sys.stdin.isatty():
        raise UsageError(
            "deploy asks for confirmation, and there is no terminal to ask on: pass --yes "
            "(or run `plan` first to see what it would do)."
        )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_CANCELLED


def _main(argv: Sequence[str] | None) -> int:
    handler: logging.Handler | None = None
    log_path: Path | None = None
    session: Session | None = None
    args: argparse.Namespace | None = None
    # Read when an argument names an environment, or after parsing: `--help` and `completion` need no config.
    lazy = LazyConfig()
    try:
        try:
            args = build_parser(lazy.env_names).parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error argparse already printed (2)
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        except ConfigUnreadable as e:
            raise e.error from None
        if args.command == "completion":
            print(completion_script(args.shell, build_parser()), end="")
            return EXIT_OK
        if args.command == "config-check" and args.file is not None:
            # the file named on the command line: nothing else (settings, ledger, clusters) is read
            try:
                return _config_check(load_config(Path(args.file)), args.file)
            except ConfigError as e:
                print(f"error: {e.message}", file=sys.stderr)
                return EXIT_USAGE
        settings = lazy.settings()
        handler, log_path = _setup_logging(settings)
        config = lazy.load()
        if args.command == "config-check":
            return _config_check(config, str(settings.funnelcake_config))
        session = Session(settings, config, json=getattr(args, "json", False))
        cmd = None if args.command in ("approve", "deny") else command_of(args, config.env_names)
        session.principal = whoami(args, config)
        if cmd is not None:
            _refuse_unconfirmable(args, cmd)
        return asyncio.run(_dispatch(session, args, cmd))
    except KeyboardInterrupt:
        if session and session.following:
            print(
                f"stopped following deploy {session.deploy_id}; it goes on without this terminal",
                file=sys.stderr,
            )
            return EXIT_CANCELLED
        stopped = (
            f": deploy {session.deploy_id} — {session.stopped or 'stopped'}; its locks are released"
            if session and session.deploy_id
            else ""
        )
        print(f"cancelled{stopped}", file=sys.stderr)
        return EXIT_CANCELLED
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Refused as e:
        print(f"error: not allowed: {e}", file=sys.stderr)
        print("hint: the README's authorization matrix says who may do what", file=sys.stderr)
        return EXIT_REFUSED
    except (ConfigError, LedgerUnavailable) as e:  # a DATABASE_URL that cannot work, a ledger that is down
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as e:
        print(f"error: invalid environment variables:\n{env_problems(e)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`funnelcake status --json | head`): not an error worth a message.
        _silence_stdout()
        return EXIT_FAILED
    except BotError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"hint: {e.hint}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as e:
        log.exception("internal error in `%s %s`", PROG, getattr(args, "command", ""))
        where = f"see {log_path}" if log_path else "see logs"
        # Only the type: an unexpected exception's text may quote a URL or header with a secret in it.
        print(f"error: internal error: {type(e).__name__} ({where})", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _silence_stdout() -> None:
    # Python flushes stdout again at exit and would report the broken pipe a second time.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def run() -> NoReturn:
    """The `funnelcake` command: main(), then exit without tearing the interpreter down.

    Freeing every module of SQLAlchemy, pydantic and kubernetes_asyncio one by one at exit takes longer than
    a `history` itself (about 0.2 s here). Nothing is lost by skipping it: the output is flushed, the log file
    was closed by main(), and the exit hooks (kubernetes_asyncio's temporary CA files) still run.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    atexit._run_exitfuncs()
    logging.shutdown()
    os._exit(code)
