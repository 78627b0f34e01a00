"""Start the bot: settings → logging → service → Slack front + metrics → Socket Mode or HTTP; SIGTERM stops it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections import Counter
from collections.abc import Sequence

import aiohttp
from aiohttp import web
from pydantic import ValidationError
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot.errors import BotError, ConfigError, LedgerUnavailable
from bot.ledger.models import DeployRecord
from bot.logs import register_settings_secrets, setup_logging
from bot.metrics import Metrics, SlackErrorCounter, add_metrics_route
from bot.pipeline.engine import Reporter
from bot.service import DeployService
from bot.settings import Settings, env_problems
from bot.watcher import Watcher
from bot.wiring import build_service
from handlers.app import SlackFront
from handlers.http import EdgeRunner, web_app
from handlers.incidents import SlackIncidents

log = logging.getLogger("funnelcake")

SHUTDOWN_GRACE = 25.0  # Kubernetes gives 30 s between SIGTERM and SIGKILL: hand over well within it


def _require(settings: Settings) -> list[str]:
    missing = []
    if settings.slack_bot_token is None:
        missing.append("SLACK_BOT_TOKEN (the bot token, xoxb-…)")
    if settings.slack_mode == "socket" and settings.slack_app_token is None:
        missing.append(
            "SLACK_APP_TOKEN (an app-level token, xapp-…, for Socket Mode; or set SLACK_MODE=http)"
        )
    if settings.slack_mode == "http" and settings.slack_signing_secret is None:
        missing.append("SLACK_SIGNING_SECRET (verifies Slack's HTTP requests)")
    return missing


async def _recovery_loop(service: DeployService, every: float) -> None:
    while True:
        try:
            taken = await service.recover()
            if taken:
                log.warning("taking over deploys whose bot stopped: %s", ", ".join(taken))
        except asyncio.CancelledError:
            raise
        except BotError as e:  # the ledger is unreachable: weather, not a bug
            log.warning("recovery pass skipped: %s; retrying in %.1f s", e.message, every)
        except Exception:
            log.exception("recovery pass failed; retrying in %.1f s", every)
        await asyncio.sleep(every)


async def _retention_loop(service: DeployService, keep_days: float, every: float) -> None:
    """Prune step rows older than `keep_days` now and every `every` seconds; a failed pass waits for the next."""
    while True:
        try:
            pruned = await service.deps.ledger.prune_steps(keep_days)
            if pruned:
                log.info("pruned %d deploy step rows older than %g days", pruned, keep_days)
        except asyncio.CancelledError:
            raise
        except BotError as e:
            log.warning("step pruning skipped: %s; retrying in %.0f s", e.message, every)
        except Exception:
            log.exception("step pruning failed; retrying in %.0f s", every)
        await asyncio.sleep(every)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    config = settings.load()
    assert settings.slack_bot_token is not None  # noqa: S101 - checked by _require
    async with aiohttp.ClientSession() as session, build_service(settings, config) as service:
        metrics = Metrics(envs=config.env_names, lock_source=service.deps.ledger)
        client = AsyncWebClient(
            token=settings.slack_bot_token.get_secret_value(),
            base_url=settings.slack_api_url,
            session=session,
            # The counter first: the client stops asking handlers at the first that retries.
            retry_handlers=[SlackErrorCounter(metrics), AsyncRateLimitErrorRetryHandler(max_retry_count=5)],
        )
        secret = settings.slack_signing_secret.get_secret_value() if settings.slack_signing_secret else None
        front = SlackFront(service, client, signing_secret=secret)

        def reporters(record: DeployRecord) -> Sequence[Reporter]:
            return [*front.reporters_for(record), metrics.reporter(record.envs, record.kind.value)]

        service.reporters = reporters  # the front installed its Slack reporters alone; add the metrics
        socket: AsyncSocketModeHandler | None = None
        ledger_readiness = LedgerReadiness()

        async def readiness() -> list[str]:
            problems = []
            try:
                await service.deps.ledger.schema_version()
            except Exception as e:  # noqa: BLE001 - a probe answers 503 with a reason, never a 500
                problems.append(ledger_readiness.problem(e))
            else:
                ledger_readiness.ok()
            if socket is not None and not await socket.client.is_connected():
                problems.append("slack: Socket Mode is not connected")
            return problems

        app = web_app(front, readiness=readiness, slack_events=settings.slack_mode == "http")
        add_metrics_route(app, metrics)
        runner = EdgeRunner(app)
        await runner.setup()
        await web.TCPSite(runner, settings.http_host, settings.http_port).start()
        if settings.slack_mode == "socket":
            assert settings.slack_app_token is not None  # noqa: S101 - checked by _require
            socket = AsyncSocketModeHandler(
                front.app, settings.slack_app_token.get_secret_value(), web_client=client
            )
            await socket.connect_async()  # type: ignore[no-untyped-call]  # Bolt leaves it unannotated
        recovery = asyncio.create_task(_recovery_loop(service, settings.recovery_every), name="recovery")
        retention = (
            asyncio.create_task(
                _retention_loop(service, settings.step_retention_days, settings.retention_every),
                name="retention",
            )
            if settings.step_retention_days is not None
            else None
        )
        watcher = _watcher(service, SlackIncidents(client, config), metrics, settings)
        if watcher is not None:
            watcher.on_open.append(front.incidents_changed)  # the Home boards follow the incidents
        watching = asyncio.create_task(watcher.run(), name="watcher") if watcher is not None else None
        log.info("funnelcake-bot ready (%s mode, %s)", settings.slack_mode, ", ".join(config.env_names))
        try:
            await stop.wait()
        finally:
            log.info("stopping: no new requests; handing running deploys over to another bot")
            recovery.cancel()
            if retention is not None:
                retention.cancel()
            if watching is not None and watcher is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
                await watcher.stop()  # the other replica watches from its next look
            if socket is not None:
                await socket.close_async()  # type: ignore[no-untyped-call]  # Bolt leaves it unannotated
            # Hand over, never cancel: only a person cancels. Another bot (or this one, restarted) resumes
            # each deploy from its recorded step; the threads say so before the process ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_GRACE):
                    await service.shutdown()
                    await front.flush()
            await front.shutdown()
            await runner.cleanup()
            for task in (recovery, retention):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task


class LedgerReadiness:
    """What /readyz says about the ledger: generic words anyone may read (no host, port, database name or
    driver text); the details go to the log, once per outage and each time they change."""

    def __init__(self) -> None:
        self._said: str | None = None

    def ok(self) -> None:
        if self._said is not None:
            log.info("the ledger answers again")
        self._said = None

    def problem(self, e: Exception) -> str:
        reason = e.reason if isinstance(e, LedgerUnavailable) else "it answered with an error"
        detail = e.detail if isinstance(e, LedgerUnavailable) else type(e).__name__
        said = str(e) if isinstance(e, BotError) else type(e).__name__
        if said != self._said:
            self._said = said
            log.warning("not ready: %s (%s)", said, detail)
        return f"ledger unreachable: {reason}"


def _watcher(
    service: DeployService, notifier: SlackIncidents, metrics: Metrics, settings: Settings
) -> Watcher | None:
    config = service.config
    if not config.watch.enabled:
        log.info("watcher off (watch.enabled is false)")
        return None
    if not any(config.alerts_channel(env) for env in config.environments):
        log.info(
            "watcher off: no channel to post incidents in (set watch.channel or an env's alerts_channel)"
        )
        return None
    watcher = Watcher(service, notifier, lease_ttl=settings.lease_ttl)
    watcher.on_open.append(
        lambda incidents: metrics.set_incidents(Counter((i.env, i.kind) for i in incidents))
    )
    watcher.on_behind.append(metrics.set_commits_behind)
    return watcher


def main() -> int:
    try:
        settings = Settings()
        setup_logging(settings.log_format, settings.log_level)
        register_settings_secrets(settings)
        missing = _require(settings)
        if missing:
            print("error: missing settings:\n" + "\n".join(f"  - {m}" for m in missing), file=sys.stderr)
            return 2
        settings.load()  # fail fast, with every problem listed, before connecting anywhere
    except BotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValidationError as e:
        print(f"error: invalid environment variables:\n{env_problems(e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # LOG_FORMAT / LOG_LEVEL
        print(f"error: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(run())
    except (ConfigError, LedgerUnavailable) as e:  # a DATABASE_URL that cannot work, a ledger that is down
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
