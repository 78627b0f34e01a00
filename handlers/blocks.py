"""Block Kit builders: every message the bot posts, kept inside Slack's limits (50 blocks, 3000 chars a section)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bot.drift import DriftReport, ServiceRow
from bot.ledger.models import DeployRecord
from bot.models import CommitInfo, DeployKind, Plan, plural
from bot.pipeline.events import DeploySummary, Diagnosed
from bot.pipeline.vocab import RUN_STEPS
from bot.settings import FunnelcakeConfig
from handlers import buttons as drawn
from handlers.blockkit import (
    MAX_BLOCKS,
    MAX_BUTTON_VALUE,
    MAX_SECTION,
    Block,
    actions,
    button,
    clip,
    context,
    divider,
    esc,
    esc_keep_mentions,
    fit,
    header,
    mention,
    rollback_confirm,
    section,
    when,
)
from handlers.watcher_blocks import incident_blocks

# The Block Kit primitives live in blockkit.py and the watcher's incident messages in watcher_blocks.py;
# every name is still found here (`bk.section`, `bk.incident_blocks`).
__all__ = [
    "ICONS",
    "MAX_BLOCKS",
    "MAX_BUTTON_VALUE",
    "MAX_SECTION",
    "STEPS",
    "Block",
    "Links",
    "actions",
    "button",
    "clip",
    "context",
    "diagnosis_blocks",
    "divider",
    "endpoint_lines",
    "esc",
    "esc_keep_mentions",
    "fit",
    "header",
    "history_blocks",
    "incident_blocks",
    "mention",
    "plan_blocks",
    "progress_bar",
    "rollback_confirm",
    "root_blocks",
    "run_steps",
    "section",
    "state_line",
    "status_blocks",
    "step_line",
    "summary_text",
    "title",
    "when",
]

STEPS = RUN_STEPS[DeployKind.DEPLOY]
ICONS = {"done": "✅", "skipped": "⏭️", "failed": "❌", "errored": "⚠️", "cancelled": "🛑", "stopped": "⏸️"}


def progress_bar(done: int, total: int, width: int = 8) -> str:
    filled = round(width * done / total) if total else 0
    return "▰" * filled + "▱" * (width - filled)


def title(record: DeployRecord) -> str:
    envs = ", ".join(record.envs)
    ref = record.short or record.ref
    if record.kind is DeployKind.ROLLBACK:
        return f"↩️ Roll back {envs} to {ref}"
    if record.kind is DeployKind.FORCE_MIGRATE:
        return f"🗄️ Force migration version {record.ref} in {envs}, then migrate up"
    if record.kind is DeployKind.MIGRATE:
        return f"🗄️ Migrate {envs} @ {ref}"
    return f"🚀 Deploy funnelcake @ {ref} → {envs}"


@dataclass(frozen=True)
class Links:
    """Where a reader can look further: the app repo's and GitOps repo's web pages, each env's Argo CD apps.
    Everything is optional; an unset one just leaves its link out."""

    app: str | None = None
    gitops: str | None = None
    argocd: Mapping[str, Sequence[tuple[str, str]]] = field(default_factory=dict)  # env -> (label, url)

    @classmethod
    def of(cls, config: FunnelcakeConfig) -> Links:
        def web(url: object) -> str | None:
            return str(url).rstrip("/") if url else None

        apps: dict[str, list[tuple[str, str]]] = {}
        for env in config.environments:
            base = web(env.argocd.url)
            if base:
                apps[env.name] = [
                    (service.value, f"{base}/applications/{env.argocd.namespace}/{app}")
                    for service, app in env.argocd.applications.items()
                ]
        return cls(web(config.repos.app.web_url), web(config.repos.gitops.web_url), apps)

    def commit(self, sha: str, label: str) -> str:
        return f"<{self.app}/commit/{sha}|{label}>" if self.app and sha else f"`{label}`"

    def compare(self, old: str, new: str) -> str | None:
        return f"<{self.app}/compare/{old}...{new}|{old} → {new}>" if self.app and old and new else None

    def gitops_commit(self, sha: str) -> str:
        return f"<{self.gitops}/commit/{sha}|{sha[:7]}>" if self.gitops else f"`{sha[:7]}`"

    def line(self, record: DeployRecord) -> str | None:
        """The root message's links: what changed (compare views) and where it runs (Argo CD apps)."""
        parts: list[str] = []
        for env in record.envs:
            compare = self.compare(record.previous_tags.get(env, ""), record.short or "")
            if compare:
                parts.append(f"{esc(env)}: {compare}")
            for label, url in self.argocd.get(env, ()):
                parts.append(f"<{url}|Argo CD {esc(env)}/{esc(label)}>")
        return " · ".join(parts) or None


def root_blocks(
    record: DeployRecord,
    *,
    links: Links | None = None,
    state: str,
    subject: str = "",
    plan: Plan | None = None,
    approval: str | None = None,
    buttons: Sequence[Block] = (),
    outcome: str | None = None,
) -> list[Block]:
    if record.kind is DeployKind.FORCE_MIGRATE:
        what = f"*Version* `{esc(record.ref)}` (marked clean with `force`, then `migrate up` runs)"
    else:
        short = record.short or esc(record.ref)
        commit = links.commit(record.sha or "", short) if links and record.sha else f"`{short}`"
        what = "*Commit* " + commit + (f" “{esc(subject)}”" if subject else "")
    blocks = [
        header(title(record)),
        section(f"*Requested by* {mention(record.requester)} · deploy `{record.id}`\n{what}"),
    ]
    if plan is not None:
        blocks += plan_blocks(plan)
    where = links.line(record) if links else None
    if where:
        blocks.append(context(where))
    blocks.append(context(state))
    if approval:
        blocks.append(context(approval))
    if outcome:
        blocks.append(section(outcome))
    if buttons:
        blocks.append(actions(f"deploy:{record.id}", *buttons))
    return fit(blocks)


def plan_blocks(plan: Plan, *, max_commits: int = 15) -> list[Block]:
    images = []
    for img in plan.images():
        digest = f" `{img.digest[7:19]}`" if img.digest else ""
        if img.action == "present":
            what = "present"
        elif img.action == "promote":
            what = f"promote from {img.source_env}"
        else:
            what = "*build* for linux/amd64"
        images.append(f"• {img.env}/{img.image}:{img.tag} — {what}{digest}")
    overlays = []
    dropped: list[CommitInfo] = []
    for env, ep in plan.env_plans.items():
        for move in ep.moves:
            line = esc(move.describe(plan.commit.short))
            overlays.append(f"• {env}/{line.replace('DOWNGRADE', '*downgrade*')}")
            dropped += [c for c in move.behind if c not in dropped]
        if not ep.moves:
            overlays.append(f"• {env}: no overlay found")
    commits = [f"• `{c.short}` {esc(c.subject)} — {esc(c.author)}" for c in plan.commits[:max_commits]]
    if len(plan.commits) > max_commits:
        commits.append(f"… and {len(plan.commits) - max_commits} more")
    unchanged = all(m.kind == "unchanged" for ep in plan.env_plans.values() for m in ep.moves)
    runs = any(ep.run_migrations for ep in plan.env_plans.values())
    if plan.migrations:
        migrations = "\n".join(f"• `{esc(m)}`" for m in plan.migrations)
    else:
        migrations = "`migrate up` (idempotent: no known baseline)" if runs else "none"
    blocks = [
        section("*Images*\n" + ("\n".join(images) or "none")),
        section("*Overlays*\n" + "\n".join(overlays)),
        section(
            f"*Commits included* ({len(plan.commits)})\n"
            + ("\n".join(commits) or ("none (same commit)" if unchanged else "none"))
        ),
    ]
    if dropped:
        lines = [f"• `{c.short}` {esc(c.subject)} — {esc(c.author)}" for c in dropped[:max_commits]]
        if len(dropped) > max_commits:
            lines.append(f"… and {len(dropped) - max_commits} more")
        blocks.append(section(f"*Commits removed* ({len(dropped)}): a downgrade\n" + "\n".join(lines)))
    blocks.append(section("*Migrations that will run*\n" + migrations))
    if plan.warnings:
        blocks.append(section("*Warnings*\n" + "\n".join(f"⚠️ {esc(w)}" for w in plan.warnings)))
    if plan.overridden:
        gates = "\n".join(f"• {esc(g)}" for g in plan.overridden)
        blocks.append(section(f"*Promotion gate overridden*: {esc(plan.override_reason or '')}\n{gates}"))
    if plan.problems:
        blocks.append(section("*Blocking problems*\n" + "\n".join(f"• {esc(p)}" for p in plan.problems)))
    return blocks


def run_steps(kind: DeployKind) -> tuple[str, ...]:
    """The steps a run of this kind goes through: what its progress bar counts."""
    return RUN_STEPS[kind]


def state_line(record: DeployRecord, steps: Mapping[str, str], current: str | None, seconds: float) -> str:
    names = run_steps(record.kind)
    done = sum(1 for s in names if steps.get(s) in ("done", "skipped"))
    failed = next((s for s in names if steps.get(s) in ("failed", "errored")), None)
    where = f"✗ {failed}" if failed else (current or "starting")
    return f"{progress_bar(done, len(names))} {done}/{len(names)} {where} · {seconds:.0f}s"


def step_line(step: str, kind: str, message: str, elapsed: float) -> str:
    icon = ICONS.get(kind, "•")
    text = f"{icon} *{step}*"
    if kind in ("failed", "errored"):
        text += f" {kind}"
    if message:
        text += f" — {esc_keep_mentions(message)}"
    return text + f" _({elapsed:.1f}s)_"


def endpoint_lines(lines: object) -> list[str]:
    """verify's relay and API checks, one line per env (`{env: line}` from the step's output or the summary)."""
    if not isinstance(lines, Mapping):
        return []
    return [f"📡 {esc(str(env))}: {esc(str(line))}" for env, line in lines.items()]


def diagnosis_blocks(deploy_id: str, short: str | None, d: Diagnosed) -> list[Block]:
    blocks = [
        section(f"🩺 *Diagnosis* ({esc(d.env)}): {esc(d.cause)}"),
        section("*Evidence*\n> " + esc(d.evidence).replace("\n", "\n> ")),
        section(f"*Fix*: {esc(d.fix)}"),
    ]
    details = d.detail_lines()
    if details:
        blocks.append(context(" · ".join(esc(line) for line in details)))
    buttons = [
        button(
            "Roll back",
            "rollback",
            drawn.command(f"rollback {d.env}", ran=short),
            "danger",
            confirm=rollback_confirm(d.env),
        )
    ]
    if short:
        buttons.append(button("Rebuild", "rebuild", drawn.command(f"deploy {d.env} {short}", ran=short)))
    blocks.append(actions(f"diagnosis:{deploy_id}", *buttons))
    return blocks


def _overlay_api(report: DriftReport, env: str) -> str | None:
    """The api tag `env`'s overlay held when the report was made: what a button drawn from it acts on."""
    for e in report.envs:
        if e.env == env:
            return next((r.overlay_tag for r in e.rows if r.service == "api"), None)
    return None


def summary_text(summary: DeploySummary, ok: bool, message: str, links: Links | None = None) -> str:
    seconds = summary.seconds if summary.seconds is not None else 0
    envs = ", ".join(summary.envs)
    force = summary.force
    if ok and force is not None:
        applied = ", ".join(f"`{esc(m)}`" for m in force.applied) or "no change"
        return (
            f"🎉 *Done* in {seconds}s: version {force.version} forced clean in {envs}, "
            f"then `migrate up` ran: {applied}"
        )
    if ok:
        lines = [f"🎉 *Done*: {summary.deploy_kind} of `{summary.short}` to {envs} in {seconds}s"]
        for name, digest in summary.images.items():
            lines.append(f"• {name} `{(digest or '')[:19]}`")
        if summary.revision:
            revision = summary.revision
            lines.append(
                f"Argo CD revision {links.gitops_commit(revision) if links else f'`{revision[:7]}`'}"
            )
        lines += endpoint_lines(summary.endpoints)
        return "\n".join(lines)
    if summary.state == "cancelled":
        # The service writes this text from Slack IDs (`cancelled by <@U…>`): the mention stays unescaped.
        return f"🛑 *Cancelled* after {seconds}s: {message}"
    text = f"💥 *Failed* after {seconds}s at *{summary.failed_step or '?'}*: {esc_keep_mentions(message)}"
    if summary.hint:
        text += f"\n_{esc_keep_mentions(summary.hint)}_"
    return text


# ---- status ------------------------------------------------------------------------------------

_SEVERITY = {"ok": "✅", "info": "💬", "warn": "⚠️", "error": "🔴"}


def _row(r: ServiceRow) -> str:
    icon = "✅" if r.healthy else "⚠️"
    registry = {"ok": "✅ amd64", "missing": "❌ missing", "wrong_platform": "❌ wrong arch"}.get(
        r.registry, f"❔ {r.registry}"
    )
    drift = "" if r.overlay_tag == r.live_tag else " ≠"
    return (
        f"{icon} `{r.service:<5}` git `{r.overlay_tag or '?'}`{drift} live `{r.live_tag or '?'}` · registry {registry}"
        f" · Argo {r.argo_sync}/{r.argo_health} · pods {r.ready}/{r.total}"
    )


def status_blocks(report: DriftReport) -> list[Block]:
    blocks: list[Block] = [header("funnelcake status")]
    for env in report.envs:
        lines = [f"*{env.env}*" + (f" — 🔒 {esc_keep_mentions(env.lock)}" if env.lock else "")]
        lines += [f"🔴 {part} {esc(why)}" for part, why in env.unavailable()]
        lines += [_row(r) for r in env.rows]
        if env.site:
            lines.append(f"🌐 {esc(env.site)}")
        if env.endpoints:
            lines.append(f"📡 {esc(env.endpoints)}")
        if env.behind:
            lines.append(f"↪ {plural(len(env.behind), 'commit')} behind production")
        if env.eligible is not None:
            lines.append(
                "🚦 eligible: " + (esc(", ".join(env.eligible)) or "nothing has passed the gate yet")
            )
        blocks.append(section("\n".join(lines)))
    findings = [f for f in report.findings if f.severity != "ok"]
    if findings:
        text = "\n".join(f"{_SEVERITY[f.severity]} {esc(f.env)}: {esc(f.text)}" for f in findings[:30])
        if len(findings) > 30:
            text += f"\n… and {len(findings) - 30} more"
        blocks.append(section("*Findings*\n" + text))
    else:
        blocks.append(section("✅ No drift: git, registries, Argo CD and pods agree everywhere."))
    buttons: list[Block] = []
    for f in report.findings:
        if f.action and f.action.startswith("rollback:"):
            target = f.action.split(":", 1)[1]
            label = f"Roll back {target}"
            if all(b["text"]["text"] != label for b in buttons):
                ran = _overlay_api(report, target)
                buttons.append(
                    button(
                        label,
                        f"rollback-{target}",
                        drawn.command(f"rollback {target}", ran=ran),
                        "danger",
                        confirm=rollback_confirm(target),
                    )
                )
        if f.action and f.action.startswith("catchup:"):
            _, target, short = f.action.split(":", 2)
            # action_ids must be unique within a message: one per target env
            buttons.append(
                button(
                    f"Deploy production's {short} to {target}",
                    f"catchup-{target}",
                    drawn.command(f"deploy {target} {short}", ran=_overlay_api(report, target)),
                )
            )
    if buttons:
        blocks.append(actions("status:actions", *buttons[:5]))
    return fit(blocks)


def history_blocks(records: Sequence[DeployRecord], *, more: str | None = None) -> list[Block]:
    """The page of history; `more` is the command (after `/funnelcake`) that lists the next, older page."""
    if not records:
        return [section("No deploys recorded yet.")]
    lines = []
    for r in records:
        approver = f", approved by {mention(r.approver)}" if r.approver else ""
        lines.append(
            f"`{r.id}` {r.created_at:%Y-%m-%d %H:%M} {r.kind.value} {', '.join(r.envs)} @ `{r.short or esc(r.ref)}`"
            f" — *{r.state.value}* by {mention(r.requester)}{approver}"
            + (
                f"\n    _{esc_keep_mentions(r.message[:200])}_"
                if r.message and r.state.value != "succeeded"
                else ""
            )
        )
    out = [section("*History*\n" + "\n".join(lines))]
    if more:
        out.append(context(f"Older deploys: `/funnelcake {esc(more)}`"))
    return out
