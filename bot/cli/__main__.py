"""`python -m bot.cli`: the `funnelcake` command (the Dockerfile's wrapper runs it this way)."""

from bot.cli import run

if __name__ == "__main__":
    run()
