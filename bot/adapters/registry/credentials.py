"""Who the registry client is to each host: anonymous, a user and password, or a Google access token."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from bot.errors import PermanentError, TransientError

ACCESS_TOKEN_USER = "oauth2accesstoken"  # noqa: S105 - the fixed user name Artifact Registry expects
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


class Credentials(Protocol):
    """A way to authenticate to one registry host; `identity` is safe to show to a person."""

    @property
    def identity(self) -> str: ...

    async def basic(self) -> tuple[str, str] | None:
        """User and password for a token realm or a Basic challenge; None means anonymous."""
        ...

    async def bearer(self) -> str | None:
        """A token to send before any challenge (Artifact Registry takes OAuth access tokens so)."""
        ...


class Anonymous:
    identity = "anonymous"

    async def basic(self) -> tuple[str, str] | None:
        return None

    async def bearer(self) -> str | None:
        return None


class BasicCredentials:
    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password

    @property
    def identity(self) -> str:
        return f"basic user {self.username}"

    async def basic(self) -> tuple[str, str] | None:
        return self.username, self._password

    async def bearer(self) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"BasicCredentials({self.username!r}, <password>)"


class GoogleAccessToken:
    """OAuth access token from google-auth (application default credentials unless given).

    google-auth is synchronous: discovery and refresh run in a thread, one at a time.
    """

    def __init__(
        self,
        credentials: Any = None,
        *,
        scopes: Iterable[str] = (CLOUD_PLATFORM_SCOPE,),
        refresh_timeout: float = 30.0,
    ) -> None:
        self._creds = credentials
        self._scopes = tuple(scopes)
        self._refresh_timeout = refresh_timeout
        self._lock = asyncio.Lock()

    @property
    def identity(self) -> str:
        email = None
        if self._creds is not None:
            email = getattr(self._creds, "service_account_email", None) or getattr(
                self._creds, "signer_email", None
            )
        who = (
            email
            if isinstance(email, str) and email and email != "default"
            else "application default credentials"
        )
        return f"{ACCESS_TOKEN_USER} (google: {who})"

    async def token(self) -> str:
        from google.auth import exceptions as gexc  # noqa: PLC0415 - keep google-auth off the import path until used
        from google.auth.transport.requests import Request  # noqa: PLC0415

        async with self._lock:
            try:
                if self._creds is None:
                    import google.auth  # noqa: PLC0415

                    async with asyncio.timeout(self._refresh_timeout):
                        self._creds, _ = await asyncio.to_thread(
                            google.auth.default, scopes=list(self._scopes)
                        )
                if not self._creds.valid:
                    async with asyncio.timeout(self._refresh_timeout):
                        await asyncio.to_thread(self._creds.refresh, Request())
            except gexc.DefaultCredentialsError as e:
                raise PermanentError(
                    f"no Google credentials for Artifact Registry: {e}",
                    hint="Set GOOGLE_APPLICATION_CREDENTIALS or use Workload Identity for the bot's pod.",
                ) from None
            except gexc.RefreshError as e:
                raise PermanentError(
                    f"Google refused to issue an access token for {self.identity}: {str(e)[:200]}",
                    hint="Check that the service account exists, is enabled and its key is valid.",
                ) from None
            except (gexc.TransportError, TimeoutError) as e:
                raise TransientError(f"could not reach Google to refresh the access token: {e}") from None
            token = self._creds.token
        if not isinstance(token, str) or not token:
            raise PermanentError(f"google-auth returned no access token for {self.identity}")
        return token

    async def basic(self) -> tuple[str, str] | None:
        return ACCESS_TOKEN_USER, await self.token()

    async def bearer(self) -> str | None:
        return await self.token()


def is_artifact_registry(host: str) -> bool:
    return host.split(":", 1)[0].endswith("-docker.pkg.dev")


class DefaultCredentials:
    """Google access token for Artifact Registry hosts, explicit credentials by host, anonymous otherwise."""

    def __init__(
        self, by_host: Mapping[str, Credentials] | None = None, google: Credentials | None = None
    ) -> None:
        self._by_host = dict(by_host or {})
        self._google = google

    def __call__(self, host: str) -> Credentials:
        if host in self._by_host:
            return self._by_host[host]
        if is_artifact_registry(host):
            if self._google is None:
                self._google = GoogleAccessToken()
            return self._google
        return Anonymous()
