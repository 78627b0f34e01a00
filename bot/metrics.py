"""Prometheus metrics on the bot's own registry: deploy results, step durations, locks, Slack API errors.

`Metrics` owns a dedicated CollectorRegistry (nothing from the process-global default leaks in, and tests
get a fresh one each). Pipeline events reach it through `MetricsReporter`, one per deploy pipeline (the
service builds its reporters per pipeline, so what must survive from the plan pipeline to the execute one,
like "this deploy's result is already counted", lives in `Metrics`). `locks_held` is read from the ledger
at scrape time, so every replica reports the same truth. Slack API errors are counted by
`SlackErrorCounter`, a retry handler that never retries and only looks at each response.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState

from bot.models import DeployKind
from bot.pipeline.engine import StepEvent, stopped_by_a_person
from bot.pipeline.events import DeploySummary
from bot.pipeline.vocab import PLAN_STEPS, EventKind

log = logging.getLogger(__name__)

RESULTS: Final = ("succeeded", "failed", "errored", "cancelled")
KINDS: Final = tuple(k.value for k in DeployKind)
# The dry-run half of a deploy: finishing it is not finishing the deploy (approval or execution follow).
# From a sub-second registry HEAD to a 30-minute build or approval wait.
STEP_BUCKETS: Final = (0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# Every series the bot exposes starts with this, so a dashboard or alert can select them all.
PREFIX: Final = "funnelcake_bot_"
_REMEMBERED_DEPLOYS = 1024
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]+")


class LockSource(Protocol):
    """What `locks_held` is read from: the ledger's live leases and manual locks."""

    async def leases(self) -> Sequence[Any]: ...

    async def locks(self) -> Sequence[Any]: ...


def _label(value: str, limit: int = 64) -> str:
    """A bounded label value: unexpected text from a remote must not become a new time series per call."""
    return _LABEL_UNSAFE.sub("_", value)[:limit] or "unknown"


class Metrics:
    """The bot's metrics and the little state needed to count each deploy's result exactly once."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        envs: Iterable[str] = (),
        lock_source: LockSource | None = None,
        refresh_timeout: float = 2.0,
    ) -> None:
        # `*_created` series double every counter and histogram and nothing here reads them. The switch is
        # process-wide in prometheus_client and read when a metric is made, so it is set before ours are.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.deploys = Counter(
            PREFIX + "deploys",
            "Deploys, rollbacks and migrations that finished, by environment and result "
            "(succeeded, failed: a check said no, errored: a system stayed unreachable, cancelled), and kind.",
            ["env", "result", "kind"],
            registry=self.registry,
        )
        self.step_duration = Histogram(
            PREFIX + "step_duration_seconds",
            "Time each pipeline step took until it finished, failed or errored (retries included), by env "
            "and deploy kind; a step of a deploy to several envs is observed once for each.",
            ["step", "env", "kind"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.locks_held = Gauge(
            PREFIX + "locks_held",
            "Holds on an environment right now: a running deploy's lease plus a manual lock (0, 1 or 2).",
            ["env"],
            registry=self.registry,
        )
        self.deploy_duration = Histogram(
            PREFIX + "deploy_duration_seconds",
            "Wall time of finished deploys, request to final state, by env and kind (deploy, rollback, migrate…).",
            ["env", "kind"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.last_success = Gauge(
            PREFIX + "last_successful_deploy_timestamp_seconds",
            "Unix time of the env's last deploy that succeeded (0: none since this bot started).",
            ["env"],
            registry=self.registry,
        )
        self.incidents_open = Gauge(
            PREFIX + "incidents_open",
            "Incidents the watcher has open right now, by env and kind (pods_failing, out_of_sync, …).",
            ["env", "kind"],
            registry=self.registry,
        )
        self._incident_labels: set[tuple[str, str]] = set()
        self.commits_behind_production = Gauge(
            PREFIX + "commits_behind_production",
            "Commits of the app repo that production runs and the env does not (0: it has all of them).",
            ["env"],
            registry=self.registry,
        )
        self.asyncio_tasks = Gauge(
            PREFIX + "asyncio_tasks",
            "Tasks alive on the bot's event loop at the scrape: flat over many deploys, or something leaks.",
            registry=self.registry,
        )
        self.slack_api_errors = Counter(
            PREFIX + "slack_api_errors",
            "Slack Web API calls that failed, by method and Slack's error code (or the transport error).",
            ["method", "error"],
            registry=self.registry,
        )
        self.lock_source = lock_source
        self.refresh_timeout = refresh_timeout
        self._envs: list[str] = []
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._starts: OrderedDict[tuple[str, str], datetime] = OrderedDict()
        self.known_envs(envs)

    def known_envs(self, envs: Iterable[str]) -> None:
        """Create every env's series at zero, so rates and alerts work before the first deploy."""
        for env in envs:
            if env in self._envs:
                continue
            self._envs.append(env)
            for result in RESULTS:
                for kind in KINDS:
                    self.deploys.labels(env=env, result=result, kind=kind)
            self.locks_held.labels(env=env).set(0)
            self.last_success.labels(env=env)

    def reporter(self, envs: Sequence[str], kind: str = "deploy") -> MetricsReporter:
        return MetricsReporter(self, envs, kind=kind)

    # ---- recording ---------------------------------------------------------------------------------------

    def deploy_finished(self, run_id: str, envs: Sequence[str], result: str, kind: str = "deploy") -> bool:
        """Count a deploy's result once per env; False if this run was already counted."""
        if result not in RESULTS:
            raise ValueError(f"unknown deploy result {result!r}; expected one of {', '.join(RESULTS)}")
        if run_id in self._finished:
            return False
        self._finished[run_id] = None
        while len(self._finished) > _REMEMBERED_DEPLOYS:
            self._finished.popitem(last=False)
        self.known_envs(envs)
        for env in envs:
            self.deploys.labels(env=env, result=result, kind=_label(kind)).inc()
        return True

    def deploy_ended(self, envs: Sequence[str], kind: str, state: str, seconds: float, at: datetime) -> None:
        """A deploy's final summary: its duration per env and kind; an env's last success time."""
        self.known_envs(envs)
        for env in envs:
            self.deploy_duration.labels(env=env, kind=_label(kind)).observe(max(seconds, 0.0))
            if state == "succeeded":
                self.last_success.labels(env=env).set(at.timestamp())

    def step_started(self, run_id: str, step: str, at: datetime) -> None:
        self._starts[(run_id, step)] = at
        while len(self._starts) > _REMEMBERED_DEPLOYS:
            self._starts.popitem(last=False)

    def step_ended(
        self, run_id: str, step: str, elapsed: float, at: datetime, *, envs: Sequence[str], kind: str
    ) -> None:
        """Observe a step's duration. Events the service emits itself (the approval wait) carry no elapsed
        time: their duration is measured from the step's STARTED event, which may have come from another
        pipeline of the same deploy."""
        started = self._starts.pop((run_id, step), None)
        if elapsed <= 0 and started is not None:
            elapsed = max((at - started).total_seconds(), 0.0)
        if elapsed > 0:
            for env in envs:
                self.step_duration.labels(step=_label(step), env=env, kind=_label(kind)).observe(elapsed)

    def set_incidents(self, counts: Mapping[tuple[str, str], int]) -> None:
        """The open incidents by (env, kind); a pair that had some and has none now goes back to 0."""
        for env, kind in self._incident_labels - set(counts):
            self.incidents_open.labels(env=env, kind=kind).set(0)
        for (env, kind), n in counts.items():
            self.incidents_open.labels(env=env, kind=_label(kind)).set(n)
        self._incident_labels |= set(counts)

    def set_commits_behind_production(self, env: str, commits: int) -> None:
        """How far `env` trails production, in commits of the app repo (0 for production itself)."""
        if commits < 0:
            raise ValueError(f"commits behind production cannot be negative, got {commits} for {env}")
        self.commits_behind_production.labels(env=env).set(commits)

    def set_commits_behind(self, counts: Mapping[str, int]) -> None:
        for env, commits in counts.items():
            self.set_commits_behind_production(env, commits)

    def slack_api_error(self, method: str, error: str) -> None:
        self.slack_api_errors.labels(method=_label(method), error=_label(error)).inc()

    def set_locks(self, counts: Mapping[str, int]) -> None:
        """Set every known env's hold count; envs absent from `counts` hold nothing."""
        self.known_envs(counts)
        for env in self._envs:
            self.locks_held.labels(env=env).set(counts.get(env, 0))

    async def refresh(self) -> None:
        """Re-read the locks from the ledger; on failure keep the last values (a scrape must not fail)."""
        self.asyncio_tasks.set(len(asyncio.all_tasks()))
        if self.lock_source is None:
            return
        source = self.lock_source
        try:
            async with asyncio.timeout(self.refresh_timeout):
                leases = await source.leases()
                locks = await source.locks()
        except TimeoutError:
            log.warning(
                "the ledger did not answer within %gs; locks_held keeps its last values", self.refresh_timeout
            )
            return
        except Exception:  # a scrape must not fail with the ledger: log it, serve the last lock values
            log.warning(
                "could not read locks from the ledger; locks_held keeps its last values", exc_info=True
            )
            return
        now = datetime.now(UTC)
        counts: dict[str, int] = {}
        for lease in leases:
            if lease.expires_at > now:
                counts[lease.env] = counts.get(lease.env, 0) + 1
        for lock in locks:
            counts[lock.env] = counts.get(lock.env, 0) + 1
        self.set_locks(counts)


class MetricsReporter:
    """Feeds one deploy's pipeline events into `Metrics`: each step's duration, and the result once.

    A deploy's result is known when a step fails, errors or is cancelled, or when the last step of a
    pipeline that is not the plan (resolve, preflight) is done or skipped.
    """

    def __init__(
        self,
        metrics: Metrics,
        envs: Sequence[str],
        *,
        kind: str = "deploy",
        plan_steps: frozenset[str] = frozenset(PLAN_STEPS),
    ) -> None:
        self.metrics = metrics
        self.envs = list(envs)
        self.kind = kind
        self.plan_steps = plan_steps

    async def emit(self, event: StepEvent) -> None:
        m = self.metrics
        if event.kind is EventKind.STARTED:
            m.step_started(event.run_id, event.step, event.at)
        elif event.kind in (EventKind.DONE, EventKind.FAILED, EventKind.ERRORED):
            m.step_ended(event.run_id, event.step, event.elapsed, event.at, envs=self.envs, kind=self.kind)
        summary = event.payload
        if isinstance(summary, DeploySummary) and summary.seconds is not None:
            m.deploy_ended(self.envs, summary.deploy_kind, summary.state, float(summary.seconds), event.at)
        result = self._result(event)
        if result is not None:
            m.deploy_finished(event.run_id, self.envs, result, self.kind)

    def _result(self, event: StepEvent) -> str | None:
        if event.kind is EventKind.FAILED:
            return "failed"
        if event.kind is EventKind.ERRORED:
            return "errored"
        if event.kind is EventKind.CANCELLED:
            return "cancelled" if stopped_by_a_person(event) else None  # else it ends in another bot
        last = event.total > 0 and event.index == event.total
        if event.kind in (EventKind.DONE, EventKind.SKIPPED) and last and event.step not in self.plan_steps:
            return "succeeded"
        return None


class SlackErrorCounter(AsyncRetryHandler):
    """Counts failed Slack Web API calls; never asks for a retry, so the client's other handlers decide.

    Install it FIRST in the client's `retry_handlers`: the client stops consulting handlers at the first
    one that retries, and this one must see every response. It sees `ok: false` answers (Slack's error
    code), HTTP 429 and 5xx, and transport errors (the exception's class name).
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(max_retry_count=0)
        self.metrics = metrics

    async def can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        method = request.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        code: str | None = None
        if error is not None:
            code = type(error).__name__
        elif response is not None:
            body = response.body if isinstance(response.body, dict) else {}
            if body.get("ok") is False:
                code = str(body.get("error") or "unknown")
            elif response.status_code == 429:
                code = "ratelimited"
            elif response.status_code >= 500:
                code = f"http_{response.status_code}"
        if code is not None:
            self.metrics.slack_api_error(method, code)
        return False

    async def _can_retry_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> bool:
        return False


# ---- the /metrics endpoint -----------------------------------------------------------------------------

METRICS_KEY: Final = web.AppKey("funnelcake_metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """The exposition format Prometheus asked for (text by default, OpenMetrics if its Accept says so)."""
    metrics = request.app[METRICS_KEY]
    await metrics.refresh()
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return web.Response(body=encoder(metrics.registry), headers={"Content-Type": content_type})


def add_metrics_route(app: web.Application, metrics: Metrics) -> None:
    """Serve `metrics` on GET /metrics of the bot's HTTP listener."""
    app[METRICS_KEY] = metrics
    app.router.add_get("/metrics", metrics_handler)
