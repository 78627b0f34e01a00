"""The `funnelcake` terminal CLI: the same operations as Slack, for when Slack is down or for scripts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from bot.errors import BotError
from bot.settings import Settings


def _config_check(settings: Settings) -> int:
    cfg = settings.load()
    for env in cfg.environments:
        approval = "approval required" if env.approval_required else "no approval"
        print(
            f"{env.name}: {env.registry} · {env.kube_context} · migrations {env.migrations.mode} · {approval}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funnelcake", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("config-check", help="validate the environments file and print a summary")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
        if args.command == "config-check":
            return _config_check(settings)
    except BotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"error: invalid environment variables:\n{e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
