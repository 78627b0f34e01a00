"""The architecture, held by a test rather than a wiki: SDKs stay in their adapters, layers point one way."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDKS = ("kubernetes_asyncio", "git", "google", "slack_sdk", "slack_bolt")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _files(*globs: str) -> list[Path]:
    return sorted(p for g in globs for p in ROOT.glob(g))


def _offenders(files: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in files:
        bad = sorted(m for m in _imports(f) if m.split(".")[0] in forbidden or m in forbidden)
        if bad:
            out[str(f.relative_to(ROOT))] = bad
    return out


def test_sdks_are_imported_only_by_adapters_and_the_slack_edge() -> None:
    core = [
        f
        for f in _files("bot/**/*.py")
        if "adapters" not in f.parts and f.name not in ("__main__.py", "metrics.py")
    ]
    # bot/__main__.py wires the Slack SDK into the front; bot/metrics.py counts Slack errors as a retry handler
    assert _offenders(core, SDKS) == {}


def test_pipeline_steps_never_import_slack_or_the_front() -> None:
    steps = _files("bot/pipeline/**/*.py", "bot/service.py", "bot/drift.py", "bot/ledger/**/*.py")
    assert _offenders(steps, ("slack_sdk", "slack_bolt", "handlers")) == {}


def test_handlers_never_talk_to_kubernetes_git_or_registries() -> None:
    handlers = _files("handlers/**/*.py")
    assert _offenders(handlers, ("kubernetes_asyncio", "git", "google")) == {}
    reaching = {
        str(f.relative_to(ROOT)): [m for m in _imports(f) if m.startswith("bot.adapters")] for f in handlers
    }
    assert {k: v for k, v in reaching.items() if v} == {}


def test_adapters_never_import_the_pipeline_service_or_front() -> None:
    adapters = _files("bot/adapters/*.py")
    bad = {
        str(f.relative_to(ROOT)): sorted(
            m for m in _imports(f) if m.startswith(("bot.pipeline", "bot.service", "handlers", "bot.drift"))
        )
        for f in adapters
    }
    assert {k: v for k, v in bad.items() if v} == {}
