"""Benchmark of the ledger at scale: the reads and writes a person waits on, with 100,000 deploys vs with 100.

For each backend (a SQLite file, and a throwaway database on the PostgreSQL at 127.0.0.1:5432), two ledgers
are seeded: one with `--big` deploys (100,000 by default) and one with `--small` (100), each deploy with its
targets and its eight pipeline steps, a third of them production deploys with a decided approval, plus lock
events. Seeding is bulk (executemany on SQLite, COPY on PostgreSQL), then the ledger is opened as the bot
opens it (schema upgrade included) and each operation below runs against both, alternating between them so
the machine's noise falls on both alike. Per operation, the median of `--runs` calls:

  history      `history` (the newest 10, every env)
  history_env  `history production` (the newest 10 of one env)
  history_page the page after the first: `history staging --before <10th id>`
  status       the ledger reads `status` does: the locks, and each gated env's eligible commits
  rollback     the ledger reads of staging's rollback target (its last success, its newest 50 deploys)
  lease        acquire then release an env's lease
  decide       approve a pending approval (the request is opened before the clock starts)

The last line is `ledger sqlite_history_x=… … pg_decide_x=…`: each `x` is big / small (target ≤ 1.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.ledger import DeployKind, DeployState, Ledger, schema
from bot.pipeline.steps.gates import eligible
from bot.settings import Promotion, load_config
from tests.testbed.pg import ThrowawayPostgres

ENVS = ("poc", "staging", "production")
STEPS = ("resolve", "preflight", "images", "migrate", "gitops", "sync", "rollout", "verify")
# production waits for a commit to succeed in staging, staging for poc: status reads both gates
GATED = {"production": "staging", "staging": "poc"}
SPAN = timedelta(days=730)  # the seeded deploys spread over two years, the newest an hour ago


def _rows(n: int, now: datetime) -> dict[str, list[dict[str, Any]]]:
    """Rows for n finished deploys, oldest first, by column name: a column a later schema adds is NULL here
    (as in a ledger upgraded in place), and a name the schema does not have is refused."""
    rnd = random.Random(n)
    out: dict[str, list[dict[str, Any]]] = {
        "deploys": [],
        "deploy_targets": [],
        "deploy_steps": [],
        "approvals": [],
        "lock_events": [],
    }
    start = now - timedelta(hours=1) - SPAN
    step_id = 0
    for i in range(n):
        created = start + SPAN * (i / n)
        finished = created + timedelta(seconds=40 + rnd.random() * 60)
        env = ENVS[i % 3]
        short = f"{rnd.getrandbits(28):07x}"
        roll = rnd.random()
        state = "succeeded" if roll < 0.85 else "failed" if roll < 0.95 else "cancelled"
        kind = "rollback" if rnd.random() < 0.05 else "deploy"
        did = f"s-{n}-{i}"[:16]
        out["deploys"].append(
            {
                "seq": i + 1,
                "id": did,
                "kind": kind,
                "envs": json.dumps([env]),
                "ref": short,
                "sha": short + "0" * 33,
                "short": short,
                "requester": "U0ALICE",
                "approver": "U0BOB" if env == "production" else None,
                "state": state,
                "message": "deployed" if state == "succeeded" else "the rollout did not become ready",
                "channel": "C0DEPLOYS",
                "thread_ts": f"{created.timestamp():.6f}",
                "created_at": created,
                "updated_at": finished,
                "finished_at": finished,
                "last_step": "verify" if state == "succeeded" else "rollout",
                "epoch": 1,
                "origin": "slack",
            }
        )
        out["deploy_targets"].append(
            {"deploy_id": did, "env": env, "tag": short, "previous_tag": f"{rnd.getrandbits(28):07x}"}
        )
        at = created
        for step in STEPS:
            step_id += 1
            end = at + timedelta(seconds=5)
            ok = state == "succeeded" or step != "rollout"
            out["deploy_steps"].append(
                {
                    "id": step_id,
                    "deploy_id": did,
                    "env": env,
                    "step": step,
                    "state": "ok" if ok else "failed",
                    "started_at": at,
                    "finished_at": end,
                    "detail": json.dumps({"env": env}),
                }
            )
            at = end
        if env == "production":
            out["approvals"].append(
                {
                    "deploy_id": did,
                    "binding": "b" * 64,
                    "requester": "U0ALICE",
                    "requested_at": created,
                    "expires_at": created + timedelta(hours=1),
                    "state": "approved",
                    "decided_by": "U0BOB",
                    "decided_at": created,
                }
            )
        if i % 50 == 0:
            out["lock_events"].append(
                {
                    "id": len(out["lock_events"]) + 1,
                    "env": env,
                    "action": "lock",
                    "user": "U0OPS",
                    "reason": "load test",
                    "at": created,
                }
            )
    return out


def _columns(table: str) -> list[str]:
    """The table's columns: the ledger's own current schema."""
    return [c.name for c in schema.metadata.tables[table].columns]


def _tuples(table: str, rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The rows as tuples in the table's column order; a key that is not one of its columns is a bug here."""
    columns = _columns(table)
    stray = {k for row in rows for k in row} - set(columns)
    if stray:
        raise SystemExit(f"bench/ledger.py seeds {table} with columns it does not have: {sorted(stray)}")
    return [tuple(row.get(c) for c in columns) for row in rows]


def _sqlite_value(v: Any) -> Any:
    # what the ledger's UTCDateTime stores on SQLite: naive UTC text that sorts as time does
    return v.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ") if isinstance(v, datetime) else v


def _seed_sqlite(path: Path, rows: dict[str, list[dict[str, Any]]]) -> None:
    db = sqlite3.connect(path)
    try:
        with db:
            for table, named in rows.items():
                if not named:
                    continue
                values = _tuples(table, named)
                names = ", ".join(f'"{c}"' for c in _columns(table))
                marks = ", ".join("?" * len(values[0]))
                db.executemany(
                    f"INSERT INTO {table} ({names}) VALUES ({marks})",  # noqa: S608 - our own table names
                    ([_sqlite_value(v) for v in row] for row in values),
                )
    finally:
        db.close()


async def _seed_pg(dsn: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        for table, named in rows.items():
            if named:
                values = _tuples(table, named)
                await conn.copy_records_to_table(table, records=values, columns=_columns(table), timeout=300)
        for table in ("deploys", "deploy_steps", "lock_events"):
            # the serial columns go on from the seeded ids, as they would after real inserts
            await conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', '"  # noqa: S608 - our own names
                f"{'seq' if table == 'deploys' else 'id'}'), (SELECT max({'seq' if table == 'deploys' else 'id'}) FROM {table}))"
            )
        # autovacuum would analyse a table this size within a minute; do it now
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


class Case:
    """One ledger under test and the ids its operations need."""

    def __init__(self, ledger: Ledger, n: int) -> None:
        self.ledger = ledger
        self.n = n
        self.counter = 0
        self.page_cursor = ""

    async def prepare(self) -> None:
        page = await self.ledger.history("staging", 10)
        self.page_cursor = page[-1].id

    def fresh_id(self) -> str:
        self.counter += 1
        return f"b-{self.counter}"


# the repository's own environments, each gated as GATED says
GATE_ENVS = [
    env.model_copy(update={"promotion": Promotion(after=GATED[env.name])})
    for env in load_config(Path(__file__).resolve().parent.parent / "config" / "funnelcake.yaml").environments
    if env.name in GATED
]


async def op_history(c: Case) -> None:
    await c.ledger.history(None, 10)


async def op_history_env(c: Case) -> None:
    await c.ledger.history("production", 10)


async def op_history_page(c: Case) -> None:
    await c.ledger.history("staging", 10, before=c.page_cursor)


async def op_status(c: Case) -> None:
    await asyncio.gather(c.ledger.locks(), *(eligible(c.ledger, env) for env in GATE_ENVS))


async def op_rollback(c: Case) -> None:
    # what the rollback target reads (bot.lookups): the last success, then the env's recent deploys
    await c.ledger.last_succeeded("staging")
    await c.ledger.history("staging", 50)


async def op_lease(c: Case) -> None:
    lease = await c.ledger.acquire_lease("poc", holder="bench", deploy_id=c.fresh_id(), ttl=60)
    await c.ledger.release_lease("poc", "bench", epoch=lease.epoch)


OPS: dict[str, Callable[[Case], Awaitable[None]]] = {
    "history": op_history,
    "history_env": op_history_env,
    "history_page": op_history_page,
    "status": op_status,
    "rollback": op_rollback,
    "lease": op_lease,
}


async def _time(c: Case, op: str) -> float:
    if op == "decide":
        d = await c.ledger.create_deploy(
            kind=DeployKind.DEPLOY, envs=["production"], ref="abc1234", short="abc1234", requester="U0ALICE"
        )
        await c.ledger.request_approval(
            d.id, binding="b", requester="U0ALICE", expires_at=datetime.now(UTC) + timedelta(hours=1)
        )
        t0 = time.perf_counter()
        await c.ledger.decide(d.id, user="U0BOB", decision="approve", binding="b")
        took = time.perf_counter() - t0
        # finished, as approved deploys end up: the next round's history and gates see a normal ledger
        await c.ledger.update_deploy(d.id, state=DeployState.SUCCEEDED)
        return took
    t0 = time.perf_counter()
    await OPS[op](c)
    return time.perf_counter() - t0


async def measure(small: Case, big: Case, runs: int) -> dict[str, tuple[float, float]]:
    """op -> (median small, median big) in seconds, the two ledgers called alternately."""
    out: dict[str, tuple[float, float]] = {}
    for op in [*OPS, "decide"]:
        times: dict[int, list[float]] = {small.n: [], big.n: []}
        for i in range(runs + 3):
            for c in (small, big) if i % 2 else (big, small):
                took = await _time(c, op)
                if i >= 3:  # the first calls warm the connection pool and the statement caches
                    times[c.n].append(took)
        out[op] = (statistics.median(times[small.n]), statistics.median(times[big.n]))
    return out


async def open_seeded(
    url: str, n: int, seed: Callable[[dict[str, list[dict[str, Any]]]], Awaitable[None]]
) -> tuple[Case, float]:
    # the schema as the bot creates it, then the rows in bulk, then the ledger the bot opens
    led = await Ledger.open(url)
    await led.close()
    rows = _rows(n, datetime.now(UTC))
    t0 = time.perf_counter()
    await seed(rows)
    took = time.perf_counter() - t0
    case = Case(await Ledger.open(url, query_timeout=60), n)
    await case.prepare()
    return case, took


def report(
    backend: str, sizes: tuple[int, int], seeds: tuple[float, float], results: dict[str, tuple[float, float]]
) -> dict[str, float]:
    small_n, big_n = sizes
    print(f"\n{backend}: seeded {small_n} deploys in {seeds[0]:.2f} s, {big_n} in {seeds[1]:.2f} s")
    print(f"  {'operation':<13} {small_n:>10} {big_n:>10}   ratio")
    ratios = {}
    for op, (a, b) in results.items():
        ratios[op] = b / a
        print(f"  {op:<13} {a * 1000:>8.2f}ms {b * 1000:>8.2f}ms   {b / a:.2f}x")
    return ratios


async def bench_sqlite(small_n: int, big_n: int, runs: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="funnelcake-ledger-bench-") as root:
        cases = []
        seeds = []
        for n in (small_n, big_n):
            path = Path(root) / f"ledger-{n}.db"

            async def seed(rows: dict[str, list[dict[str, Any]]], path: Path = path) -> None:
                await asyncio.to_thread(_seed_sqlite, path, rows)

            case, took = await open_seeded(f"sqlite+aiosqlite:///{path}", n, seed)
            cases.append(case)
            seeds.append(took)
        try:
            results = await measure(cases[0], cases[1], runs)
        finally:
            for c in cases:
                await c.ledger.close()
    return report("SQLite", (small_n, big_n), (seeds[0], seeds[1]), results)


async def bench_pg(small_n: int, big_n: int, runs: int) -> dict[str, float]:
    dbs = [ThrowawayPostgres(), ThrowawayPostgres()]
    cases: list[Case] = []
    seeds = []
    try:
        for db, n in zip(dbs, (small_n, big_n), strict=True):
            await db.start()

            async def seed(rows: dict[str, list[dict[str, Any]]], dsn: str = db.dsn) -> None:
                await _seed_pg(dsn, rows)

            case, took = await open_seeded(db.url, n, seed)
            cases.append(case)
            seeds.append(took)
        results = await measure(cases[0], cases[1], runs)
    finally:
        for c in cases:
            await c.ledger.close()
        for db in dbs:
            await db.stop()
    return report("PostgreSQL", (small_n, big_n), (seeds[0], seeds[1]), results)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--big", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--backend", choices=("both", "sqlite", "pg"), default="both")
    args = parser.parse_args()
    figures: dict[str, float] = {}
    if args.backend in ("both", "sqlite"):
        figures |= {
            f"sqlite_{op}_x": x for op, x in (await bench_sqlite(args.small, args.big, args.runs)).items()
        }
    if args.backend in ("both", "pg"):
        figures |= {f"pg_{op}_x": x for op, x in (await bench_pg(args.small, args.big, args.runs)).items()}
    print("ledger " + " ".join(f"{k}={v:.2f}" for k, v in figures.items()))


if __name__ == "__main__":
    asyncio.run(main())
