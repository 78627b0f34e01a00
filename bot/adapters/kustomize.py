"""The kustomize render check run before a GitOps commit: an overlay must render the exact image expected.

Split out of bot.adapters.gitops (GitOpsRepo._render_check calls it with the repo's kubectl and timeout).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from bot.adapters.childenv import child_env, communicate
from bot.errors import PermanentError, TransientError


async def render_check(kubectl: str, rel: str, overlay_dir: Path, expected: str, *, limit: float) -> None:
    """`kubectl kustomize` the overlay: a Deployment must come out running exactly `expected`."""
    try:
        proc = await asyncio.create_subprocess_exec(
            kubectl,
            "kustomize",
            str(overlay_dir),
            env=child_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise PermanentError(
            f"{kubectl} is not installed: cannot render {rel} to check it.",
            hint="Install kubectl (it bundles kustomize) in the bot's image.",
        ) from None
    try:
        out, err = await communicate(proc, limit)
    except TimeoutError:
        raise TransientError(f"Rendering {rel} with kustomize took more than {limit:g}s.") from None
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip().splitlines()
        raise PermanentError(
            f"{rel} does not render with kustomize: {' | '.join(detail[-3:])}",
            hint="Fix the overlay in the GitOps repo; nothing was committed.",
        )
    images: list[str] = []
    try:
        docs = [d for d in yaml.safe_load_all(out) if isinstance(d, dict)]
    except yaml.YAMLError as e:
        raise PermanentError(f"kustomize output for {rel} is not YAML: {e}") from None
    for doc in docs:
        if doc.get("kind") != "Deployment":
            continue
        spec = (((doc.get("spec") or {}).get("template") or {}).get("spec")) or {}
        for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            if isinstance(c, dict) and isinstance(c.get("image"), str):
                images.append(c["image"])
    if expected not in images:
        found = ", ".join(images) or "no Deployment image"
        raise PermanentError(
            f"{rel} renders {found}, not {expected}: the images entry's name does not match the "
            "image in the base manifests, or newName points at another registry.",
            hint="Fix the overlay in the GitOps repo; nothing was committed.",
        )
