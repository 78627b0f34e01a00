"""The pipeline engine: outcomes, retries inside a time budget, cancellation, events in order."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from bot.errors import PermanentError, TransientError
from bot.pipeline.engine import Pipeline, Retry, Skip, Step, StepEvent, StepOutcome, StepProgress
from bot.pipeline.events import DeploySummary, Diagnosed, DirtyMigration, read_payload
from bot.pipeline.vocab import SUMMARY_STEP, EventKind, StepName


class Recorder:
    def __init__(self) -> None:
        self.events: list[StepEvent] = []

    async def emit(self, event: StepEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[tuple[str, str]]:
        return [(e.step, e.kind.value) for e in self.events]


FAST = Retry(attempts=4, wait_initial=0.001, wait_max=0.002, wait_jitter=0.0)


class Ok(Step[dict[str, Any]]):
    name = "ok"
    timeout = 1.0

    async def run(self, ctx: dict[str, Any], progress: StepProgress) -> Mapping[str, Any]:
        await progress("half way", {"n": 1})
        ctx["ran"] = [*ctx.get("ran", []), self.name]
        return {"digest": "sha256:abc"}


class Flaky(Step[dict[str, Any]]):
    name = "flaky"
    timeout = 1.0
    retry = FAST

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise TransientError("registry 127.0.0.1:5000 unavailable: 503")


class Denied(Step[dict[str, Any]]):
    name = "denied"

    async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
        raise PermanentError("tag e7e79eb missing from the poc registry", hint="Promote it first.")


class Nothing(Step[dict[str, Any]]):
    name = "migrate"

    async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
        raise Skip("no migration changed")


class Slow(Step[dict[str, Any]]):
    name = "slow"
    timeout = 0.05

    async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
        await asyncio.sleep(10)


class Holds(Step[dict[str, Any]]):
    name = "holds"
    timeout = 10

    def __init__(self) -> None:
        self.released = False
        self.entered = asyncio.Event()

    async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
        try:
            self.entered.set()
            await asyncio.sleep(10)
        finally:
            self.released = True


async def test_steps_run_in_order_and_emit_typed_events() -> None:
    rec = Recorder()
    ctx: dict[str, Any] = {}
    result = await Pipeline("d-1", [Ok(), Nothing()], [rec]).run(ctx)
    assert result.ok
    assert [r.outcome for r in result.results] == [StepOutcome.OK, StepOutcome.SKIPPED]
    assert result.results[0].data == {"digest": "sha256:abc"}
    assert rec.kinds() == [
        ("ok", "started"),
        ("ok", "progress"),
        ("ok", "done"),
        ("migrate", "started"),
        ("migrate", "skipped"),
    ]
    assert rec.events[1].data == {"n": 1}
    assert (rec.events[3].index, rec.events[3].total) == (2, 2)


async def test_transient_errors_are_retried_then_succeed() -> None:
    rec = Recorder()
    flaky = Flaky(failures=2)
    result = await Pipeline("d-2", [flaky], [rec]).run({})
    assert result.ok
    assert flaky.calls == 3
    assert result.results[0].attempts == 3
    assert [k for _, k in rec.kinds()].count("retrying") == 2


async def test_transient_errors_that_persist_end_as_errored_with_the_cause() -> None:
    result = await Pipeline("d-3", [Flaky(failures=99), Ok()], [Recorder()]).run({})
    assert not result.ok
    assert len(result.results) == 1
    failed = result.failed
    assert failed is not None
    assert failed.outcome is StepOutcome.ERRORED
    assert failed.message == "registry 127.0.0.1:5000 unavailable: 503 (gave up after 4 attempts)"


class RegistryDown(TransientError):
    """An adapter's fault after its own retries (as the registry client raises)."""


class TwoSystems(Step[dict[str, Any]]):
    """A step that calls a system retrying by itself (RegistryDown) and one that does not (git)."""

    name = "two-systems"
    timeout = 1.0
    retry = Retry(attempts=4, wait_initial=0.001, wait_max=0.002, wait_jitter=0.0, not_again=(RegistryDown,))

    def __init__(self, *faults: TransientError) -> None:
        self.faults = list(faults)
        self.calls = 0

    async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
        self.calls += 1
        if self.faults:
            raise self.faults.pop(0)


async def test_a_fault_its_adapter_already_retried_is_not_retried_again() -> None:
    down = RegistryDown("registry 127.0.0.1:5000 unavailable: 503", hint="Gave up after 4 attempts.")
    step = TwoSystems(down, TransientError("git fetch timed out"))
    result = await Pipeline("d-3b", [step], [Recorder()]).run({})
    assert step.calls == 1
    failed = result.failed
    assert failed is not None and failed.outcome is StepOutcome.ERRORED
    # the adapter's own count of attempts, not the engine's "(gave up after 1 attempt)"
    assert failed.message == "registry 127.0.0.1:5000 unavailable: 503"
    assert failed.hint == "Gave up after 4 attempts."


async def test_a_fault_of_a_system_that_does_not_retry_is_still_retried_by_the_step() -> None:
    step = TwoSystems(TransientError("git fetch timed out"), TransientError("git fetch timed out"))
    result = await Pipeline("d-3c", [step], [Recorder()]).run({})
    assert result.ok
    assert step.calls == 3


async def test_permanent_error_stops_the_pipeline_without_retry() -> None:
    rec = Recorder()
    ctx: dict[str, Any] = {}
    result = await Pipeline("d-4", [Denied(), Ok()], [rec]).run(ctx)
    assert result.failed is not None
    assert result.failed.outcome is StepOutcome.FAILED
    assert result.failed.hint == "Promote it first."
    assert "ran" not in ctx
    assert rec.kinds() == [("denied", "started"), ("denied", "failed")]


async def test_the_engine_owns_time() -> None:
    result = await Pipeline("d-5", [Slow()], [Recorder()]).run({})
    assert result.failed is not None
    assert result.failed.outcome is StepOutcome.ERRORED
    assert result.failed.message == "slow did not finish within 0.05s"


async def test_a_configured_budget_overrides_the_steps_own() -> None:
    budgets = {"holds": 0.05}.get
    result = await Pipeline("d-5b", [Ok(), Holds()], [Recorder()], budgets=budgets).run({})
    assert result.failed is not None and result.failed.step == "holds"
    assert result.failed.message == "holds did not finish within 0.05s"  # not the step's own 10 s


async def test_cancellation_is_reported_and_releases_what_the_step_holds() -> None:
    rec = Recorder()
    holds = Holds()
    task = asyncio.create_task(Pipeline("d-6", [holds, Ok()], [rec]).run({}), name="deploy-d-6")
    await holds.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert holds.released
    assert rec.kinds()[-1] == ("holds", "cancelled")


async def test_a_broken_reporter_does_not_break_the_deploy() -> None:
    class Broken:
        async def emit(self, event: StepEvent) -> None:
            raise RuntimeError("slack is down")

    rec = Recorder()
    result = await Pipeline("d-7", [Ok()], [Broken(), rec]).run({})
    assert result.ok
    assert rec.kinds()[-1] == ("ok", "done")


async def test_a_crashing_step_is_reported_without_a_traceback() -> None:
    class Buggy(Step[dict[str, Any]]):
        name = "buggy"

        async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
            raise KeyError("oops")

    rec = Recorder()
    result = await Pipeline("d-8", [Buggy()], [rec]).run({})
    assert result.failed is not None
    assert result.failed.message == "internal error in buggy: KeyError"
    assert rec.events[-1].kind is EventKind.ERRORED


async def test_retry_after_from_the_remote_is_honoured() -> None:
    class RateLimited(Step[dict[str, Any]]):
        name = "limited"
        timeout = 2.0
        retry = FAST

        def __init__(self) -> None:
            self.times: list[float] = []

        async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
            self.times.append(asyncio.get_running_loop().time())
            if len(self.times) == 1:
                raise TransientError("429 from Argo CD", delay=0.2)

    step = RateLimited()
    result = await Pipeline("d-9", [step], [Recorder()]).run({})
    assert result.ok
    assert step.times[1] - step.times[0] >= 0.19


async def test_a_fanned_out_step_reports_the_permanent_verdict_not_the_group() -> None:
    class FanOut(Step[dict[str, Any]]):
        name = "sync"
        retry = FAST

        async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
            async def ok() -> None:
                await asyncio.sleep(0.01)

            async def bad() -> None:
                raise PermanentError("Argo CD sync of funnelcake-api in poc failed: revision not found")

            async with asyncio.TaskGroup() as tg:
                tg.create_task(ok())
                tg.create_task(bad())

    result = await Pipeline("d-10", [FanOut()], [Recorder()]).run({})
    assert result.failed is not None
    assert result.failed.outcome is StepOutcome.FAILED
    assert result.failed.message == "Argo CD sync of funnelcake-api in poc failed: revision not found"


async def test_events_reach_reporters_scrubbed_of_credentials() -> None:
    class Leaky(Step[dict[str, Any]]):
        name = "migrate"

        async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
            raise PermanentError(
                "migration failed in clickhouse://ch:9000?username=admin&password=hunter2-secret",
                data={"log": "dial tcp: xoxb-1234567890-abcdefghij failed"},
            )

    rec = Recorder()
    await Pipeline("d-11", [Leaky()], [rec]).run({})
    failed = rec.events[-1]
    assert "hunter2-secret" not in failed.message
    assert "xoxb-1234567890-abcdefghij" not in str(failed.data)


# ---- typed payloads: what the reporters read, and what the ledger stores --------------------------


class CrashLoops(Step[dict[str, Any]]):
    name = "rollout"

    async def run(self, ctx: dict[str, Any], progress: StepProgress) -> None:
        diagnosed = Diagnosed(
            "poc",
            "api keeps crashing (exit code 1, 4 restarts)",
            "fatal: cannot reach github with ghp_" + "a" * 36,
            "Read the last log lines above; fix the cause or roll back to the previous tag.",
            kind="crash-loop",
            deployment="funnelcake-api",
            details={"container": "api", "exit code": "1"},
        )
        raise PermanentError("api keeps crashing", hint="Roll back.", data=diagnosed.to_json())


async def test_a_failed_steps_diagnosis_reaches_reporters_typed_and_scrubbed() -> None:
    rec = Recorder()
    result = await Pipeline("r1", [CrashLoops()], [rec]).run({})
    assert result.failed is not None and result.failed.step == StepName.ROLLOUT
    failed = rec.events[-1]
    assert isinstance(failed.payload, Diagnosed)
    assert (failed.payload.env, failed.payload.kind, failed.payload.deployment) == (
        "poc",
        "crash-loop",
        "funnelcake-api",
    )
    assert failed.payload.details == {"container": "api", "exit code": "1"}
    assert failed.hint == "Roll back."
    # a credential quoted in the evidence is scrubbed from the payload, as from the stored data
    assert "ghp_" not in failed.payload.evidence and "ghp_" not in str(failed.data)


def test_step_rows_written_before_the_payload_types_read_back_the_same() -> None:
    # a failed rollout's and a dirty migration's step details, as the ledger holds them from earlier releases
    old_rollout = {
        "env": "staging",
        "deployment": "funnelcake-api",
        "diagnosis": {
            "cause": "c",
            "evidence": "e",
            "fix": "f",
            "kind": "exec-format",
            "pod": "p",
            "promote_from": [],
        },
        "hint": "h",
    }
    diagnosed = read_payload("rollout", EventKind.FAILED, old_rollout)
    assert diagnosed == Diagnosed("staging", "c", "e", "f", "exec-format", "p", "funnelcake-api")
    assert diagnosed.to_json()["diagnosis"] == {**old_rollout["diagnosis"], "details": {}}
    old_migrate = {"env": "poc", "outcome": "dirty", "log": "error: …", "dirty_version": 7, "hint": "h"}
    dirty = read_payload("migrate", EventKind.FAILED, old_migrate)
    assert dirty == DirtyMigration("poc", 7, "dirty", "error: …")
    assert {**dirty.to_json(), "hint": "h"} == old_migrate
    # the summary's JSON keeps its keys; `pushed` only when a cancel told it
    summary = DeploySummary(state="cancelled", envs=("poc",), seconds=3, pushed=False)
    assert read_payload(SUMMARY_STEP, EventKind.CANCELLED, summary.to_json()) == summary
    assert "pushed" not in DeploySummary(state="failed").to_json()
    # step names are the strings the ledger stores
    assert StepName.FORCE_MIGRATE == "force-migrate" and SUMMARY_STEP == "deploy"
