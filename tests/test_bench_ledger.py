"""bench/ledger.py seeds the ledger's tables directly: run it small, on both backends, so a schema change
that its rows no longer fit breaks this test and not the next `make bench`."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def test_the_ledger_benchmark_runs_on_the_current_schema_and_prints_every_ratio() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "bench" / "ledger.py"),
        "--small",
        "20",
        "--big",
        "60",
        "--runs",
        "5",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 100)
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    last = text.strip().splitlines()[-1]
    ops = ("history", "history_env", "history_page", "status", "rollback", "lease", "decide")
    names = [f"{backend}_{op}_x" for backend in ("sqlite", "pg") for op in ops]
    assert last.startswith("ledger "), last
    figures = dict(pair.split("=") for pair in last.split()[1:])
    assert list(figures) == names
    assert all(re.fullmatch(r"\d+\.\d+", v) for v in figures.values()), figures
