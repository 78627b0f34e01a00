"""Test-bed part: a Docker token server (the `auth: token` realm) that signs registry JWTs, like Artifact Registry's.

It accepts Basic credentials (by default user `oauth2accesstoken` with a known password, as Artifact
Registry does with a Google access token), grants pull/push on whatever scopes are asked, and counts
requests so tests can prove that concurrent callers share one token. Usable outside pytest:
`async with TokenServer() as ts: LocalRegistry(token_server=ts)`;
the `token_server` and `token_registry` fixtures live in tests.testbed.registry (the registered plugin).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

ACCESS_TOKEN_USER = "oauth2accesstoken"
DEFAULT_PASSWORD = "ya29.testbed-access-token"  # stands in for a Google OAuth access token


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """aiohttp token endpoint on 127.0.0.1 with a throwaway RSA key and self-signed certificate."""

    def __init__(
        self,
        users: dict[str, str] | None = None,
        *,
        service: str = "testbed-registry",
        issuer: str = "testbed-token-issuer",
        ttl: int = 300,
    ) -> None:
        self.users = dict(users) if users is not None else {ACCESS_TOKEN_USER: DEFAULT_PASSWORD}
        self.service = service
        self.issuer = issuer
        self.ttl = ttl
        self.dir = Path(tempfile.mkdtemp(prefix="tokenauth-"))
        self.cert_path = self.dir / "root.pem"
        self.requests: list[dict[str, Any]] = []  # one entry per token request: user, scopes, status
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("token server not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    @property
    def token_requests(self) -> int:
        return len(self.requests)

    def sign(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {
            "alg": "RS256",
            "typ": "JWT",
            "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(sig)}"

    async def _token(self, request: web.Request) -> web.Response:
        scopes = [s for raw in request.query.getall("scope", []) for s in raw.split()]
        entry: dict[str, Any] = {"user": None, "scopes": scopes, "service": request.query.get("service")}
        self.requests.append(entry)
        auth = request.headers.get("Authorization", "")
        user = None
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                user = password = None
            if user is None or self.users.get(user) != password:
                entry["status"] = 401
                return web.json_response(
                    {"errors": [{"code": "UNAUTHORIZED", "message": "invalid credentials"}]},
                    status=401,
                    headers={"WWW-Authenticate": f'Basic realm="{self.realm}"'},
                )
        entry["user"] = user
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) >= 3 and parts[0] == "repository":
                # anonymous callers get pull only, like a public repository
                wanted = parts[-1].split(",")
                actions = wanted if user else [a for a in wanted if a == "pull"]
                access.append({"type": "repository", "name": ":".join(parts[1:-1]), "actions": actions})
        token = self.sign(user or "anonymous", access)
        entry["status"] = 200
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": self.ttl,
                "issued_at": dt.datetime.now(dt.UTC).isoformat(),
            }
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self._port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        shutil.rmtree(self.dir, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
