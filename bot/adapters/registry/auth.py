"""Token auth for the registry client: what each host asked for, and the cache of registry tokens.

A mixin: RegistryClient's base (client.py) owns the state declared here and the session, and
its request primitive drives the challenge handling that fills `_hosts`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp
from yarl import URL

from bot.adapters.registry.credentials import Anonymous, Credentials, is_artifact_registry
from bot.adapters.registry.wire import _error_text, _raise_for_refusal, _Retryable
from bot.errors import PermanentError


@dataclass
class _HostAuth:
    mode: Literal["unknown", "anonymous", "token", "basic"] = "unknown"
    realm: str = ""
    service: str = ""
    direct_bearer_failed: bool = False


_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_RE.findall(rest))


class _TokenAuth:
    """Per-host auth (anonymous, Basic, or registry tokens from the host's realm) with a token cache."""

    _credentials: Callable[[str], Credentials]
    _retry_budget: float
    _hosts: dict[str, _HostAuth]
    _creds: dict[str, Credentials]
    _tokens: dict[tuple[str, str, tuple[str, ...]], tuple[str, float]]
    _token_locks: dict[tuple[str, str, tuple[str, ...]], asyncio.Lock]

    @property
    def session(self) -> aiohttp.ClientSession:
        raise NotImplementedError  # pragma: no cover - the client's base owns the session

    def _creds_for(self, host: str) -> Credentials:
        if host not in self._creds:
            self._creds[host] = self._credentials(host)
        return self._creds[host]

    async def _token(self, host: str, auth: _HostAuth, scopes: tuple[str, ...]) -> str:
        key = (auth.realm, auth.service, scopes)
        cached = self._tokens.get(key)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        # one fetch per scope even when many requests hit an unknown scope at once
        lock = self._token_locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            creds = self._creds_for(host)
            basic = await creds.basic()
            headers = {"Authorization": aiohttp.encode_basic_auth(*basic)} if basic else {}
            params = [("service", auth.service)] if auth.service else []
            params += [("scope", s) for s in scopes]
            realm_host = URL(auth.realm).host or auth.realm
            try:
                async with self.session.get(auth.realm, params=params, headers=headers) as r:
                    body = await r.read()
                    status = r.status
                    await _raise_for_refusal(
                        r,
                        realm_host,
                        cap=self._retry_budget,
                        denied=lambda status, body: PermanentError(
                            f"registry {host} token service refused {creds.identity} (HTTP {status}) "
                            f"for {' '.join(scopes)}: {_error_text(body)}",
                            hint=self._auth_hint(host, creds),
                        ),
                        retry=lambda status, _: f"token endpoint answered HTTP {status}",
                    )
            except (aiohttp.ClientError, TimeoutError) as e:
                raise _Retryable(realm_host, f"token endpoint {auth.realm}: {type(e).__name__} {e}") from e
            if status != 200:
                raise PermanentError(
                    f"registry {host} token endpoint answered HTTP {status}: {_error_text(body)}"
                )
            try:
                payload = json.loads(body)
                token = payload.get("token") or payload["access_token"]
                ttl = float(payload.get("expires_in") or 60)
            except (ValueError, KeyError, TypeError):
                raise PermanentError(f"registry {host} token endpoint sent an unreadable answer") from None
            # renew a little early so a token never expires between the cache check and the request
            self._tokens[key] = (str(token), time.monotonic() + max(ttl - 10, ttl / 2))
            return str(token)

    async def _auth_headers(self, host: str, scopes: tuple[str, ...]) -> dict[str, str]:
        auth = self._hosts.setdefault(host, _HostAuth())
        creds = self._creds_for(host)
        if auth.mode == "token":
            return {"Authorization": f"Bearer {await self._token(host, auth, scopes)}"}
        if auth.mode == "basic":
            basic = await creds.basic()
            return {"Authorization": aiohttp.encode_basic_auth(*basic)} if basic else {}
        if auth.mode == "unknown" and not auth.direct_bearer_failed:
            bearer = await creds.bearer()
            if bearer:
                return {"Authorization": f"Bearer {bearer}"}
        return {}

    def _auth_hint(self, host: str, creds: Credentials) -> str:
        if is_artifact_registry(host):
            return (
                f"Grant {creds.identity} Artifact Registry Reader (to check and pull) or Writer (to promote) "
                f"on this repository, or fix the bot's Google credentials."
            )
        if isinstance(creds, Anonymous):
            return f"Registry {host} needs credentials: configure them for this host."
        return f"Check the credentials configured for {host} and their rights on this repository."

    def _denied(self, host: str, repo: str, action: str, status: int, body: bytes) -> PermanentError:
        creds = self._creds_for(host)
        return PermanentError(
            f"registry {host} denied {action} on repository {repo} for {creds.identity} "
            f"(HTTP {status}: {_error_text(body)})",
            hint=self._auth_hint(host, creds),
        )
