"""Exec credential plugins for the kube clients: one in-memory token cache per process.

Split out of bot.adapters.kube (which re-exports these names): the plugin is run by the bot, not by
kubernetes_asyncio, and its ExecCredential's token is reused by every context with the same plugin stanza until
status.expirationTimestamp.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.adapters.childenv import communicate, plugin_env
from bot.errors import PermanentError, TransientError

# the logger keeps the name it had before the split, so log filters and tests that select it still match
log = logging.getLogger("bot.adapters.kube")


_BODY_LIMIT = 300  # error bodies are truncated: they can echo objects, never let them flood a message


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# The bot's own secrets: a credential plugin needs the caller's environment (HOME, PATH, CLOUDSDK_*), not these.
@dataclass(frozen=True)
class Credential:
    """What an exec plugin answered: the Authorization header value and when it stops being valid."""

    header: str
    expiry: dt.datetime | None


class ExecCredentialCache:
    """Exec-plugin credentials kept in memory until they expire, shared by every context with the same plugin.

    The key is the user's `exec` stanza (command, args, env, apiVersion): kubeconfigs written by
    `gcloud container fleet memberships get-credentials` give every context its own user with the same
    stanza, and gke-gcloud-auth-plugin answers with the account's access token whichever cluster asks (the
    library sends the plugin no cluster information). So a command touching three clusters runs the plugin
    once, and again only when the token is about to expire or a server refused it (401).
    """

    def __init__(self) -> None:
        self._entries: dict[str, Credential] = {}
        # one lock per key and event loop: an asyncio.Lock is bound to the loop it first waited in
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
            weakref.WeakKeyDictionary()
        )

    @staticmethod
    def key(exec_config: Mapping[str, Any]) -> str:
        env = sorted((str(e.get("name")), str(e.get("value"))) for e in exec_config.get("env") or [])
        return json.dumps(
            [exec_config.get("command"), exec_config.get("args") or [], env, exec_config.get("apiVersion")]
        )

    def _lock(self, key: str) -> asyncio.Lock:
        per_loop = self._locks.setdefault(asyncio.get_running_loop(), {})
        return per_loop.setdefault(key, asyncio.Lock())

    async def get(
        self,
        exec_config: Mapping[str, Any],
        *,
        context: str,
        margin: dt.timedelta,
        plugin_limit: float,
        rejected: str | None = None,
    ) -> Credential:
        """A credential valid for at least `margin`; `rejected` is a header a server refused (never reused)."""
        key = self.key(exec_config)
        async with self._lock(key):
            entry = self._entries.get(key)
            if (
                entry is not None
                and entry.header != rejected
                and (entry.expiry is None or _now() < entry.expiry - margin)
            ):
                return entry
            entry = await self._run(exec_config, context=context, limit=plugin_limit)
            self._entries[key] = entry
            return entry

    async def _run(self, exec_config: Mapping[str, Any], *, context: str, limit: float) -> Credential:
        command = exec_config.get("command")
        api_version = exec_config.get("apiVersion")
        if not command or not api_version:
            raise PermanentError(
                f"the kubeconfig user of context {context} has an exec entry without command or apiVersion",
                hint="Regenerate the kubeconfig (gcloud container fleet memberships get-credentials …).",
            )
        env = plugin_env(
            {str(e["name"]): str(e["value"]) for e in exec_config.get("env") or [] if "name" in e}
        )
        info = {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
        env["KUBERNETES_EXEC_INFO"] = json.dumps(info)
        argv = [str(command), *map(str, exec_config.get("args") or [])]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            raise PermanentError(
                f"cannot get credentials for cluster {context}: cannot run {argv[0]}: {e.strerror or e}",
                hint=str(
                    exec_config.get("installHint") or "Install gke-gcloud-auth-plugin and put it on PATH."
                ),
            ) from None
        try:
            out, err = await communicate(proc, limit)
        except TimeoutError:
            raise TransientError(
                f"the credential plugin for cluster {context} did not answer within {limit:.0f}s",
                hint="Check gke-gcloud-auth-plugin and the gcloud login on the bot's host.",
            ) from None
        fix = "Check the kubeconfig user entry and that gke-gcloud-auth-plugin works (run it by hand)."
        if proc.returncode != 0:
            said = err.decode("utf-8", "replace").strip()[:_BODY_LIMIT]
            raise PermanentError(
                f"cannot get credentials for cluster {context}: the plugin exited with {proc.returncode}"
                + (f": {said}" if said else ""),
                hint=fix,
            )
        try:
            data = json.loads(out)
            status = data["status"]
            token = status["token"]
        except (ValueError, KeyError, TypeError):
            raise PermanentError(
                f"cannot get credentials for cluster {context}: the plugin did not print an ExecCredential "
                "with status.token (client certificates from a plugin are not supported)",
                hint=fix,
            ) from None
        if data.get("apiVersion") != api_version:
            raise PermanentError(
                f"cannot get credentials for cluster {context}: the plugin answered apiVersion "
                f"{data.get('apiVersion')}, the kubeconfig asks for {api_version}",
                hint=fix,
            )
        expiry: dt.datetime | None = None
        stamp = status.get("expirationTimestamp")
        if isinstance(stamp, str):
            try:
                expiry = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
            except ValueError:
                expiry = None
            if expiry is not None and expiry.tzinfo is None:
                expiry = expiry.replace(tzinfo=dt.UTC)
        log.info("ran the credential plugin for context %s (token valid until %s)", context, expiry)
        return Credential(f"Bearer {token}", expiry)


# One per process: every client (and every `funnelcake` command) reuses an unexpired token.
EXEC_CREDENTIALS = ExecCredentialCache()
