"""Metrics scraped over real HTTP: deploy results from real pipeline runs, locks from a real ledger, Slack errors
from the slack_sdk client against the local Slack."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot.errors import PermanentError, TransientError
from bot.ledger import Ledger
from bot.ledger.models import DeployKind, DeployState
from bot.metrics import Metrics, MetricsReporter, SlackErrorCounter, add_metrics_route
from bot.pipeline.engine import Pipeline, Retry, Step, StepEvent
from bot.pipeline.vocab import STOP_HANDOVER, SUMMARY_STEP, EventKind
from tests.testbed.slack import BOT_TOKEN, FakeSlack

ENVS = ("production", "staging", "poc")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scraper:
    """The bot's /metrics route on a real port, read the way Prometheus reads it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        add_metrics_route(app, self.metrics)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/metrics"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def raw(self, accept: str | None = None) -> tuple[str, str]:
        headers = {"Accept": accept} if accept else {}
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
            s.get(self.url, headers=headers) as r,
        ):
            assert r.status == 200, await r.text()
            return r.headers["Content-Type"], await r.text()

    async def samples(self) -> Samples:
        _, text = await self.raw()
        out: Samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture
async def scraper() -> AsyncIterator[Scraper]:
    s = Scraper(Metrics(envs=ENVS))
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


class Ok(Step[None]):
    def __init__(self, name: str, sleep: float = 0.02) -> None:
        self.name = name
        self.sleep = sleep

    async def run(self, ctx: None, progress: Callable[..., Awaitable[None]]) -> Mapping[str, Any] | None:
        await asyncio.sleep(self.sleep)
        return None


class Raises(Step[None]):
    retry = Retry(attempts=2, wait_initial=0.01, wait_max=0.01, wait_jitter=0)

    def __init__(self, name: str, exc: Exception) -> None:
        self.name = name
        self.exc = exc

    async def run(self, ctx: None, progress: Callable[..., Awaitable[None]]) -> Mapping[str, Any] | None:
        raise self.exc


class Hangs(Step[None]):
    name = "rollout"

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def run(self, ctx: None, progress: Callable[..., Awaitable[None]]) -> Mapping[str, Any] | None:
        self.entered.set()
        await asyncio.sleep(60)
        return None


async def run(metrics: Metrics, run_id: str, envs: Sequence[str], steps: Sequence[Step[None]]) -> None:
    await Pipeline(run_id, steps, [metrics.reporter(envs)]).run(None)


async def test_successful_deploy_counts_once_after_plan_and_execute(scraper: Scraper) -> None:
    m = scraper.metrics
    # the service runs the plan and the execution as two pipelines, each with fresh reporters
    await run(m, "d1", ["staging"], [Ok("resolve"), Ok("preflight")])
    before = await scraper.samples()
    assert (
        value(before, "funnelcake_bot_deploys_total", env="staging", result="succeeded", kind="deploy") == 0
    )
    await run(m, "d1", ["staging"], [Ok("images"), Ok("gitops"), Ok("verify")])
    after = await scraper.samples()
    assert value(after, "funnelcake_bot_deploys_total", env="staging", result="succeeded", kind="deploy") == 1
    for env in ("production", "poc"):
        assert value(after, "funnelcake_bot_deploys_total", env=env, result="succeeded", kind="deploy") == 0
    for step in ("resolve", "preflight", "images", "gitops", "verify"):
        labels = {"step": step, "env": "staging", "kind": "deploy"}
        assert value(after, "funnelcake_bot_step_duration_seconds_count", **labels) == 1
        assert value(after, "funnelcake_bot_step_duration_seconds_sum", **labels) >= 0.02
    verify = {"step": "verify", "env": "staging", "kind": "deploy"}
    assert value(after, "funnelcake_bot_step_duration_seconds_bucket", **verify, le="0.25") == 1


async def test_step_durations_and_results_carry_the_env_and_the_deploy_kind(scraper: Scraper) -> None:
    m = scraper.metrics
    await Pipeline("r1", [Ok("gitops")], [m.reporter(["production"], "rollback")]).run(None)
    s = await scraper.samples()
    rollback = {"step": "gitops", "env": "production", "kind": "rollback"}
    assert value(s, "funnelcake_bot_step_duration_seconds_count", **rollback) == 1
    assert (
        "funnelcake_bot_step_duration_seconds_count",
        frozenset({**rollback, "kind": "deploy"}.items()),
    ) not in s
    # the result is counted under the deploy's kind too
    assert (
        value(s, "funnelcake_bot_deploys_total", env="production", result="succeeded", kind="rollback") == 1
    )
    assert value(s, "funnelcake_bot_deploys_total", env="production", result="succeeded", kind="deploy") == 0


async def test_every_series_has_the_prefix_and_none_is_created(scraper: Scraper) -> None:
    m = scraper.metrics
    await run(m, "p1", ["staging"], [Ok("images"), Ok("verify")])
    m.slack_api_error("chat.postMessage", "channel_not_found")
    m.set_commits_behind_production("staging", 3)
    m.set_commits_behind_production("production", 0)
    _, text = await scraper.raw()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert names, text
    assert all(n.startswith("funnelcake_bot_") for n in names), sorted(names)
    assert not [n for n in names if n.endswith("_created")], "no *_created series"
    assert "_created" not in text
    s = await scraper.samples()
    assert value(s, "funnelcake_bot_commits_behind_production", env="staging") == 3
    assert value(s, "funnelcake_bot_commits_behind_production", env="production") == 0
    with pytest.raises(ValueError, match="cannot be negative"):
        m.set_commits_behind_production("staging", -1)


async def test_failed_and_errored_deploys_count_for_every_env(scraper: Scraper) -> None:
    m = scraper.metrics
    await run(
        m,
        "d2",
        ["staging", "poc"],
        [Ok("images"), Raises("gitops", PermanentError("tag missing")), Ok("verify")],
    )
    await run(m, "d3", ["poc"], [Raises("sync", TransientError("argocd timed out"))])
    s = await scraper.samples()
    assert value(s, "funnelcake_bot_deploys_total", env="staging", result="failed", kind="deploy") == 1
    assert value(s, "funnelcake_bot_deploys_total", env="poc", result="failed", kind="deploy") == 1
    assert value(s, "funnelcake_bot_deploys_total", env="poc", result="errored", kind="deploy") == 1
    assert value(s, "funnelcake_bot_deploys_total", env="poc", result="succeeded", kind="deploy") == 0
    # the failed step's time counts; the step after it never ran
    # a deploy to two envs: its step is observed for each
    for env in ("staging", "poc"):
        assert (
            value(s, "funnelcake_bot_step_duration_seconds_count", step="gitops", env=env, kind="deploy") == 1
        )
    assert not any(
        name == "funnelcake_bot_step_duration_seconds_count" and ("step", "verify") in labels
        for name, labels in s
    )


async def test_cancelled_deploy_is_counted_once(scraper: Scraper) -> None:
    m = scraper.metrics
    hang = Hangs()
    task = asyncio.create_task(run(m, "d4", ["production"], [hang]), name="test-deploy-d4")
    await asyncio.wait_for(hang.entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # a second terminal event for the same deploy (e.g. the service reporting the lock) must not count again
    await m.reporter(["production"]).emit(StepEvent("d4", "lock", EventKind.FAILED, "held"))
    s = await scraper.samples()
    assert value(s, "funnelcake_bot_deploys_total", env="production", result="cancelled", kind="deploy") == 1
    assert value(s, "funnelcake_bot_deploys_total", env="production", result="failed", kind="deploy") == 0


async def test_a_hand_over_is_not_a_cancelled_deploy(scraper: Scraper) -> None:
    m = scraper.metrics
    hang = Hangs()
    task = asyncio.create_task(run(m, "d6", ["poc"], [hang]), name="test-deploy-d6")
    await asyncio.wait_for(hang.entered.wait(), 5)
    task.cancel(STOP_HANDOVER)  # the bot is stopping: another bot finishes the deploy and counts it
    with pytest.raises(asyncio.CancelledError):
        await task
    s = await scraper.samples()
    assert value(s, "funnelcake_bot_deploys_total", env="poc", result="cancelled", kind="deploy") == 0


async def test_deploy_duration_and_last_success_come_from_the_final_summary(scraper: Scraper) -> None:
    m = scraper.metrics
    summary = {"state": "succeeded", "deploy_kind": "rollback", "seconds": 42.0}
    await m.reporter(["staging"]).emit(StepEvent("d7", SUMMARY_STEP, EventKind.DONE, "deployed", summary))
    failed = {"state": "failed", "deploy_kind": "deploy", "seconds": 7.5}
    await m.reporter(["poc"]).emit(StepEvent("d8", SUMMARY_STEP, EventKind.FAILED, "no", failed))
    s = await scraper.samples()
    assert value(s, "funnelcake_bot_deploy_duration_seconds_count", env="staging", kind="rollback") == 1
    assert value(s, "funnelcake_bot_deploy_duration_seconds_sum", env="staging", kind="rollback") == 42.0
    assert value(s, "funnelcake_bot_deploy_duration_seconds_sum", env="poc", kind="deploy") == 7.5
    assert value(s, "funnelcake_bot_last_successful_deploy_timestamp_seconds", env="staging") > 1.7e9
    assert (
        value(s, "funnelcake_bot_last_successful_deploy_timestamp_seconds", env="poc") == 0
    )  # its deploy failed
    assert value(s, "funnelcake_bot_deploys_total", env="poc", result="failed", kind="deploy") == 1


async def test_approval_wait_is_measured_across_pipelines(scraper: Scraper) -> None:
    m = scraper.metrics
    started = StepEvent("d5", "approval", EventKind.STARTED, "waiting for approval")
    await MetricsReporter(m, ["production"]).emit(started)
    approved = StepEvent("d5", "approval", EventKind.DONE, "approved", at=started.at + timedelta(seconds=90))
    await MetricsReporter(m, ["production"]).emit(approved)
    s = await scraper.samples()
    approval = {"step": "approval", "env": "production", "kind": "deploy"}
    assert value(s, "funnelcake_bot_step_duration_seconds_sum", **approval) == pytest.approx(90)
    assert value(s, "funnelcake_bot_deploys_total", env="production", result="succeeded", kind="deploy") == 0


async def test_locks_held_is_read_from_the_ledger_at_scrape_time(tmp_path: Path, scraper: Scraper) -> None:
    async with await Ledger.open(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}") as ledger:
        scraper.metrics.lock_source = ledger
        record = await ledger.create_deploy(
            kind=DeployKind.DEPLOY, envs=["staging"], ref="e7e79eb", requester="U1", state=DeployState.RUNNING
        )
        await ledger.acquire_lease("staging", holder="bot-a", deploy_id=record.id, ttl=60)
        await ledger.lock("staging", "U1", "load test")
        await ledger.lock("poc", "U1", "demo")
        s = await scraper.samples()
        assert value(s, "funnelcake_bot_locks_held", env="staging") == 2
        assert value(s, "funnelcake_bot_locks_held", env="poc") == 1
        assert value(s, "funnelcake_bot_locks_held", env="production") == 0
        await ledger.release_lease("staging", "bot-a")
        await ledger.unlock("poc", "U1")
        s = await scraper.samples()
        assert value(s, "funnelcake_bot_locks_held", env="staging") == 1
        assert value(s, "funnelcake_bot_locks_held", env="poc") == 0


async def test_scrape_survives_a_broken_ledger(scraper: Scraper, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        async def leases(self) -> list[Any]:
            raise TransientError("The deploy ledger is unreachable")

        async def locks(self) -> list[Any]:
            return []

    class Slow:
        async def leases(self) -> list[Any]:
            await asyncio.sleep(10)
            return []

        async def locks(self) -> list[Any]:
            return []

    scraper.metrics.set_locks({"staging": 1})
    scraper.metrics.lock_source = Broken()
    s = await scraper.samples()
    assert value(s, "funnelcake_bot_locks_held", env="staging") == 1, "the last known value stays"
    assert "could not read locks" in caplog.text
    scraper.metrics.lock_source = Slow()
    scraper.metrics.refresh_timeout = 0.1
    s = await asyncio.wait_for(scraper.samples(), 3)
    assert value(s, "funnelcake_bot_locks_held", env="staging") == 1
    assert "did not answer" in caplog.text


async def test_openmetrics_when_asked(scraper: Scraper) -> None:
    content_type, text = await scraper.raw("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    content_type, text = await scraper.raw()
    assert content_type.startswith("text/plain")
    assert "# TYPE funnelcake_bot_deploys_total counter" in text


def test_registry_is_dedicated() -> None:
    a, b = Metrics(envs=["poc"]), Metrics(envs=["poc"])
    a.deploy_finished("x", ["poc"], "succeeded")
    assert (
        b.registry.get_sample_value(
            "funnelcake_bot_deploys_total", {"env": "poc", "result": "succeeded", "kind": "deploy"}
        )
        == 0
    )
    assert (
        REGISTRY.get_sample_value(
            "funnelcake_bot_deploys_total", {"env": "poc", "result": "succeeded", "kind": "deploy"}
        )
        is None
    )
    with pytest.raises(ValueError, match="unknown deploy result"):
        a.deploy_finished("y", ["poc"], "exploded")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_slack_api_errors_counted_from_the_real_client(slack: FakeSlack, scraper: Scraper) -> None:
    counter = SlackErrorCounter(scraper.metrics)
    # the counter goes first: the client stops asking handlers at the first that retries
    handlers = [counter, AsyncRateLimitErrorRetryHandler(max_retry_count=1)]
    async with aiohttp.ClientSession() as session:
        client = AsyncWebClient(
            token=BOT_TOKEN, base_url=slack.api_url, session=session, retry_handlers=handlers, timeout=5
        )
        await client.chat_postMessage(channel="C0DEPLOYS", text="fine")
        with pytest.raises(SlackApiError):
            await client.chat_postMessage(channel="", text="nowhere")
        bad = AsyncWebClient(token="xoxb-wrong", base_url=slack.api_url, session=session, timeout=5)
        bad.retry_handlers = [counter]
        with pytest.raises(SlackApiError):
            await bad.auth_test()
        # burst past the per-channel limit: the 429 is counted, and the rate-limit handler still retries it
        slack.post_interval, slack.post_burst = 0.5, 1
        await client.chat_postMessage(channel="C0BURST", text="1")
        await client.chat_postMessage(channel="C0BURST", text="2")
        down = AsyncWebClient(
            token=BOT_TOKEN,
            base_url=f"http://127.0.0.1:{_closed_port()}/api/",
            retry_handlers=[counter],
            timeout=2,
        )
        with pytest.raises(aiohttp.ClientConnectorError):
            await down.auth_test()
    s = await scraper.samples()
    assert (
        value(
            s, "funnelcake_bot_slack_api_errors_total", method="chat.postMessage", error="channel_not_found"
        )
        == 1
    )
    assert value(s, "funnelcake_bot_slack_api_errors_total", method="auth.test", error="invalid_auth") == 1
    assert (
        value(s, "funnelcake_bot_slack_api_errors_total", method="chat.postMessage", error="ratelimited") == 1
    )
    assert (
        value(s, "funnelcake_bot_slack_api_errors_total", method="auth.test", error="ClientConnectorError")
        == 1
    )
    total = sum(v for (name, _), v in s.items() if name == "funnelcake_bot_slack_api_errors_total")
    assert total == 4, "successful calls are not errors"
    assert len([c for c in slack.calls_to("chat.postMessage") if c.params.get("channel") == "C0BURST"]) == 3


async def test_asyncio_tasks_counts_the_loops_tasks_at_scrape_time(scraper: Scraper) -> None:
    before = value(await scraper.samples(), "funnelcake_bot_asyncio_tasks")
    assert before >= 1  # at least the scrape's own handler
    release = asyncio.Event()
    waiting = [asyncio.create_task(release.wait()) for _ in range(5)]
    assert value(await scraper.samples(), "funnelcake_bot_asyncio_tasks") == before + 5
    release.set()
    await asyncio.gather(*waiting)
    assert value(await scraper.samples(), "funnelcake_bot_asyncio_tasks") == before
