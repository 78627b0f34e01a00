"""How the CLI shows a plan, the status report and history: lines for the terminal, and the --json
documents. Part of bot/cli."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from bot.cli.parser import FINDING_SEVERITIES, PROG
from bot.colour import paint
from bot.ledger.models import DeployRecord
from bot.models import Plan, plural

if TYPE_CHECKING:
    # Only for annotations: the status report pulls in kubernetes_asyncio and the registry clients,
    # which `history`, `config-check` and `--help` must not pay for.
    from bot.drift import DriftReport


def _digest(d: str | None) -> str:
    return d.split(":", 1)[-1][:12] if d else ""


def render_plan(plan: Plan) -> list[str]:
    c = plan.commit
    subject = f' "{c.subject}"' if c.subject else ""
    author = f" by {c.author}" if c.author else ""
    lines = [f"Plan: {plan.kind.value} {c.short}{subject}{author} → {', '.join(plan.envs)}"]
    if plan.commits:
        n = len(plan.commits)
        lines.append(f"  {plural(n, 'commit')} since the deployed tag:")
        lines += [
            f"    {ci.short} {ci.subject}" + (f" ({ci.author})" if ci.author else "")
            for ci in plan.commits[:10]
        ]
        if n > 10:
            lines.append(f"    … and {n - 10} more")
    for name, ep in plan.env_plans.items():
        lines.append(f"  {name}:" + ("" if ep.moves else " no tag deployed yet"))
        for move in ep.moves:
            lines.append(f"    {move.describe(c.short)}")
            lines += [f"      - {ci.short} {ci.subject}" for ci in move.behind[:10]]
        width = max((len(f"{i.image}:{i.tag}") for i in ep.images), default=0)
        for img in ep.images:
            action = {"present": "present", "promote": f"promote from {img.source_env}", "build": "build"}[
                img.action
            ]
            detail = " ".join(x for x in (_digest(img.digest), img.note) if x)
            lines.append(f"    {img.image + ':' + img.tag:<{width}}  {action}  {detail}".rstrip())
        lines.append(f"    migrations: {'run' if ep.run_migrations else 'none to run'}")
    if plan.migrations:
        lines.append("  migrations changed: " + ", ".join(plan.migrations))
    for warning in plan.warnings:
        lines.append(f"  WARNING: {warning}")
    for gate in plan.overridden:
        lines.append(f"  OVERRIDDEN ({plan.override_reason}): {gate}")
    for problem in plan.problems:
        lines.append(f"  problem: {problem}")
    return lines


_SEVERITY_COLOUR = {"ok": "green", "info": "blue", "warn": "yellow", "error": "red"}


def render_status(report: DriftReport, *, colour: bool = False) -> list[str]:
    lines: list[str] = []
    header = ("service", "overlay", "live", "registry", "argo cd", "pods")
    for env in report.envs:
        lines.append(env.env + (f"  [{env.lock}]" if env.lock else ""))
        lines += [f"  {part}: {why}" for part, why in env.unavailable()]
        rows = [
            (
                r.service,
                r.overlay_tag or "?",
                r.live_tag or "?",
                r.registry,
                f"{r.argo_sync}/{r.argo_health}",
                f"{r.ready}/{r.total}",
            )
            for r in env.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        for row in (header, *rows):
            lines.append("  " + "  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip())
        if env.site:
            lines.append(f"  site: {env.site}")
        if env.endpoints:
            lines.append(f"  endpoints: {env.endpoints}")
        if env.behind:
            lines.append(f"  {plural(len(env.behind), 'commit')} behind production")
        if env.eligible is not None:
            lines.append("  eligible: " + (", ".join(env.eligible) or "nothing has passed the gate yet"))
        lines.append("")
    mark = {"ok": "ok", "info": "info", "warn": "WARN", "error": "ERROR"}
    if report.findings:
        lines.append("findings:")
        lines += [
            f"  {paint(f'{mark[f.severity]:<5}', _SEVERITY_COLOUR[f.severity], enabled=colour)} {f.env}: {f.text}"
            for f in report.findings
        ]
    else:
        lines.append("findings: none, every environment matches git")
    return lines


def render_history(records: Sequence[DeployRecord], *, more: str | None = None) -> list[str]:
    """The table; `more` is the command that lists the next, older page, when there is one."""
    if not records:
        return ["no deploys recorded"]
    header = ("id", "when", "kind", "envs", "commit", "state", "by", "message")
    rows = [
        (
            r.id,
            r.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
            r.kind.value,
            ",".join(r.envs),
            r.short or r.ref,
            r.state.value,
            r.requester,
            (r.message or "").replace("\n", " "),
        )
        for r in records
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(f"{v:<{w}}" for v, w in zip(row, widths, strict=True)).rstrip() for row in (header, *rows)
    ]
    if more:
        lines.append(f"older deploys: {PROG} {more}")
    return lines


# ---- JSON documents (the README's "JSON output" lists these fields; keep them stable) -------------------


def _stamp(t: datetime | None) -> str | None:
    return t.astimezone(UTC).isoformat() if t is not None else None


def record_json(r: DeployRecord) -> dict[str, Any]:
    return {
        "id": r.id,
        "kind": r.kind.value,
        "envs": list(r.envs),
        "ref": r.ref,
        "sha": r.sha,
        "short": r.short,
        "state": r.state.value,
        "requester": r.requester,
        "approver": r.approver,
        "origin": r.origin,
        "message": r.message,
        "last_step": r.last_step,
        "tags": dict(r.tags),
        "previous_tags": dict(r.previous_tags),
        "created_at": _stamp(r.created_at),
        "finished_at": _stamp(r.finished_at),
    }


def history_json(records: Sequence[DeployRecord], older: str | None = None) -> dict[str, Any]:
    """`older_than`: when older deploys remain, the id to pass as `--before` for the next page."""
    return {"deploys": [record_json(r) for r in records], "older_than": older}


def status_json(report: DriftReport) -> dict[str, Any]:
    doc = report.to_json()
    doc["has_findings"] = _has_findings(report)
    return doc


def _has_findings(report: DriftReport) -> bool:
    return any(f.severity in FINDING_SEVERITIES for f in report.findings)


# ---- shell completion ---------------------------------------------------------------------------------
