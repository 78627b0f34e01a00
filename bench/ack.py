"""Benchmark of the Slack ack path: signed slash commands at concurrency 50, our app vs a bare Bolt app that only acks.

Slack gives an app 3 s to ack; what the bot adds on top of Bolt itself is what this measures. Both servers run
in this process, on one event loop, behind the same aiohttp translation as handlers/http.py, with signature
verification on, while the whole local sandbox (registries, git remotes, three simulated clusters) runs
beside them:
  ours — the real app: build_service on the sandbox + SlackFront + web_app (tests/testbed/botrun.RunningBot);
  bare — an AsyncApp whose only listener is `/funnelcake` → ack().
The load comes from a separate process (this script with `--load`), so the client never competes for the
servers' event loop. It signs every request beforehand, warms both servers up (connections, Bolt's lazy
auth.test), then alternates rounds between them so that load from other processes on the machine falls on
both alike. The command is `help`: its answer is the ack itself, so the ack path is all that is timed.

The last line is `ack p99_ms=<ours> ratio_vs_bare=<p99 ours / p99 bare>`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

# Run as `.venv/bin/python bench/ack.py` from anywhere: the test bed lives in the repository, not the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.testbed.botrun import RunningBot
from tests.testbed.sandbox import Sandbox
from tests.testbed.slack import SIGNING_SECRET, FakeSlack, slash_command

SCRIPT = Path(__file__).resolve()
COMMAND_TEXT = "help"
REQUEST_TIMEOUT = 30.0  # far above Slack's 3 s: a slow ack is measured, not dropped
LOAD_TIMEOUT = 600.0
WARM_UP = 4  # warm-up requests per target, in multiples of the concurrency


# ---- the load generator (a separate process) -------------------------------------------------------


def _requests(n: int) -> list[tuple[bytes, dict[str, str]]]:
    """n distinct signed slash commands, as Slack sends them (each with its own trigger_id)."""
    return [slash_command(text=COMMAND_TEXT, signing_secret=SIGNING_SECRET) for _ in range(n)]


async def _round(
    session: aiohttp.ClientSession, url: str, n: int, concurrency: int, expect: str
) -> tuple[list[float], list[str]]:
    todo = _requests(n)
    latencies: list[float] = []
    errors: list[str] = []
    queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
    for item in todo:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty():
            body, headers = queue.get_nowait()
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    text = await resp.text()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            elapsed = time.perf_counter() - started
            if status != 200 or expect not in text:
                errors.append(f"HTTP {status}: {text[:120]!r}")
                continue
            latencies.append(elapsed * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


async def load(
    targets: dict[str, tuple[str, str]], requests: int, concurrency: int, rounds: int, trials: int
) -> list[dict[str, Any]]:
    """Warm each target up, then `trials` times: `requests` per target in `rounds` alternating rounds."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    per_round = [requests // rounds + (1 if i < requests % rounds else 0) for i in range(rounds)]
    connector = aiohttp.TCPConnector(limit=concurrency * len(targets))
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # Warm-up, not measured: connections opened, Bolt's lazy auth.test done, the sandbox's start-up
        # reconciles (which share the servers' loop) over.
        for url, expect in targets.values():
            _, errors = await _round(session, url, WARM_UP * concurrency, concurrency, expect)
            if errors:
                raise SystemExit(f"warm-up against {url} failed: {errors[0]}")
        for t in range(trials):
            out: dict[str, Any] = {name: {"latencies": [], "errors": [], "seconds": 0.0} for name in targets}
            for i, n in enumerate(per_round):
                order = list(targets.items())
                if (t * rounds + i) % 2:
                    order.reverse()
                for name, (url, expect) in order:
                    started = time.perf_counter()
                    latencies, errors = await _round(session, url, n, concurrency, expect)
                    out[name]["seconds"] += time.perf_counter() - started
                    out[name]["latencies"] += latencies
                    out[name]["errors"] += errors
            results.append(out)
    return results


# ---- the servers (this process) --------------------------------------------------------------------


async def _serve(app: web.Application, stack: contextlib.AsyncExitStack) -> str:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return f"http://127.0.0.1:{port}/slack/events"


async def bare_app(slack: FakeSlack, stack: contextlib.AsyncExitStack) -> str:
    """The baseline: Bolt with one listener that acks, served like handlers/http.py serves ours."""
    session = await stack.enter_async_context(aiohttp.ClientSession())
    client = AsyncWebClient(token=slack.bot_token, base_url=slack.api_url, session=session)
    bolt = AsyncApp(client=client, signing_secret=slack.signing_secret, process_before_response=False)

    async def ack_only(ack: AsyncAck) -> None:
        await ack()

    bolt.command("/funnelcake")(ack_only)

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await bolt.async_dispatch(await to_bolt_request(request)))

    app = web.Application()
    app.router.add_post("/slack/events", events)
    return await _serve(app, stack)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def _line(name: str, latencies: list[float], seconds: float, errors: int) -> str:
    rate = len(latencies) / seconds if seconds else 0.0
    return (
        f"{name:<5} n={len(latencies)} errors={errors} p50_ms={statistics.median(latencies):.1f} "
        f"p90_ms={_percentile(latencies, 0.90):.1f} p99_ms={_percentile(latencies, 0.99):.1f} "
        f"max_ms={max(latencies):.1f} rate={rate:.0f}/s"
    )


async def bench(requests: int, concurrency: int, rounds: int, trials: int) -> int:
    async with contextlib.AsyncExitStack() as stack:
        t0 = time.perf_counter()
        sandbox = await stack.enter_async_context(Sandbox())
        slack = await stack.enter_async_context(FakeSlack(post_interval=None))
        ours = RunningBot(sandbox, slack)
        await ours.start()
        stack.push_async_callback(ours.stop)
        targets = {
            "ours": (f"{ours.url}/slack/events", "/funnelcake deploy <env>"),  # the help text came back
            "bare": (await bare_app(slack, stack), ""),
        }
        print(f"sandbox and both servers up in {time.perf_counter() - t0:.1f}s", flush=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--load",
            json.dumps(targets),
            f"--requests={requests}",
            f"--concurrency={concurrency}",
            f"--rounds={rounds}",
            f"--trials={trials}",
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), LOAD_TIMEOUT)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            print(f"the load generator failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results: list[dict[str, Any]] = json.loads(out)
    print(
        f"{trials} trials of {requests} signed `/funnelcake {COMMAND_TEXT}` per app at concurrency {concurrency}, "
        f"each in {rounds} rounds alternating between the apps"
    )
    p99s: dict[str, list[float]] = {"ours": [], "bare": []}
    failed = False
    for t, trial in enumerate(results, 1):
        for name, values in p99s.items():
            r = trial[name]
            failed |= bool(r["errors"]) or not r["latencies"]
            for err in r["errors"][:3]:
                print(f"  {name} error: {err}")
            if r["latencies"]:
                values.append(_percentile(r["latencies"], 0.99))
        if len(p99s["ours"]) == len(p99s["bare"]) == t:
            print(f"trial {t}: p99_ms ours={p99s['ours'][-1]:.1f} bare={p99s['bare'][-1]:.1f}")
    if failed:
        print("some requests failed: the figures do not compare like with like", file=sys.stderr)
        return 1
    for name in p99s:
        pooled = [x for trial in results for x in trial[name]["latencies"]]
        seconds = sum(trial[name]["seconds"] for trial in results)
        print("all   " + _line(name, pooled, seconds, 0))
    # A single stall of the machine (2 shared cores) lifts every request in flight past the 99th percentile
    # of one trial: the median over trials is the figure that does not hinge on one such moment.
    p99_ours, p99_bare = statistics.median(p99s["ours"]), statistics.median(p99s["bare"])
    print(f"ack p99_ms={p99_ours:.1f} ratio_vs_bare={p99_ours / p99_bare:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000, help="signed slash commands per app")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--rounds", type=int, default=4, help="alternating rounds the requests are split into"
    )
    parser.add_argument("--trials", type=int, default=5, help="repetitions; the reported p99 is their median")
    parser.add_argument("--load", metavar="TARGETS_JSON", help=argparse.SUPPRESS)  # the client process
    args = parser.parse_args()
    if args.load:
        targets = {k: (str(v[0]), str(v[1])) for k, v in json.loads(args.load).items()}
        print(
            json.dumps(asyncio.run(load(targets, args.requests, args.concurrency, args.rounds, args.trials)))
        )
        return 0
    return asyncio.run(bench(args.requests, args.concurrency, args.rounds, args.trials))


if __name__ == "__main__":
    sys.exit(main())
