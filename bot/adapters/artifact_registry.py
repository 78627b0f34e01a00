"""Recent tags of an image in Artifact Registry, like `gcloud artifacts docker images list --include-tags`.

google-cloud-artifact-registry's async client has no REST transport (1.23), and gRPC is not always
reachable from where the bot runs: the sync REST client is used, every call in a worker thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from bot.errors import PermanentError, TransientError

_PREFIX_RE = re.compile(
    r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[a-z0-9.:-]+)/(?P<repository>[a-z0-9._-]+)$"
)


@dataclass(frozen=True)
class TaggedImage:
    """One image version (a digest) and the tags pointing at it, newest first in listings."""

    image: str
    digest: str
    tags: tuple[str, ...]
    uri: str
    upload_time: dt.datetime | None
    update_time: dt.datetime | None
    size_bytes: int


@dataclass(frozen=True)
class ArtifactRepository:
    location: str
    project: str
    repository: str

    @classmethod
    def from_prefix(cls, registry_prefix: str) -> ArtifactRepository:
        m = _PREFIX_RE.match(registry_prefix.strip().rstrip("/"))
        if not m:
            raise PermanentError(
                f"{registry_prefix!r} is not an Artifact Registry Docker repository prefix",
                hint="Expected LOCATION-docker.pkg.dev/PROJECT/REPOSITORY.",
            )
        return cls(m["location"], m["project"], m["repository"])

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/repositories/{self.repository}"

    @property
    def prefix(self) -> str:
        return f"{self.location}-docker.pkg.dev/{self.project}/{self.repository}"


def _when(value: Any) -> dt.datetime | None:
    # proto-plus gives DatetimeWithNanoseconds (a datetime) for set timestamps, None or epoch otherwise
    if isinstance(value, dt.datetime) and value.timestamp() > 0:
        return value
    return None


def _reason(e: Any) -> str:
    # REST errors read "GET <url>: <reason>"; the URL adds nothing a person needs
    return str(e.message).rsplit(": ", 1)[-1][:200]


class ArtifactRegistryTags:
    """Lists image versions with their tags. `api_endpoint` and `credentials` exist for tests and proxies."""

    def __init__(
        self,
        *,
        credentials: Any = None,
        api_endpoint: str | None = None,
        timeout: float = 30.0,
        page_size: int = 100,
        max_pages: int = 20,
    ) -> None:
        self._credentials = credentials
        self._api_endpoint = api_endpoint
        self._timeout = timeout
        self._page_size = page_size
        self._max_pages = max_pages
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    async def _get_client(self) -> Any:
        async with self._client_lock:
            if self._client is None:
                async with asyncio.timeout(self._timeout):
                    self._client = await asyncio.to_thread(self._make_client)
            return self._client

    def _make_client(self) -> Any:
        from google.auth import exceptions as gexc  # noqa: PLC0415 - SDK imports stay lazy and inside adapters
        from google.cloud import artifactregistry_v1  # noqa: PLC0415

        options = {"api_endpoint": self._api_endpoint} if self._api_endpoint else None
        try:
            return artifactregistry_v1.ArtifactRegistryClient(
                transport="rest", client_options=options, credentials=self._credentials
            )
        except gexc.DefaultCredentialsError as e:
            raise PermanentError(
                f"no Google credentials for the Artifact Registry API: {e}",
                hint="Set GOOGLE_APPLICATION_CREDENTIALS or use Workload Identity for the bot's pod.",
            ) from None

    def _list(
        self, client: Any, repo: ArtifactRepository, image: str, limit: int, tagged_only: bool
    ) -> list[TaggedImage]:
        from google.cloud import artifactregistry_v1  # noqa: PLC0415

        request = artifactregistry_v1.ListDockerImagesRequest(
            parent=repo.parent, page_size=self._page_size, order_by="update_time desc"
        )
        # gapic's own retry is off: the pipeline engine owns retries and their budget
        pager = client.list_docker_images(request=request, timeout=self._timeout, retry=None)
        wanted = f"{repo.prefix}/{image}@"
        found: list[TaggedImage] = []
        for n, page in enumerate(pager.pages):
            for d in page.docker_images:
                if not d.uri.startswith(wanted) or (tagged_only and not d.tags):
                    continue
                found.append(
                    TaggedImage(
                        image=image,
                        digest=d.uri.split("@", 1)[1],
                        tags=tuple(d.tags),
                        uri=d.uri,
                        upload_time=_when(d.upload_time),
                        update_time=_when(d.update_time),
                        size_bytes=int(d.image_size_bytes),
                    )
                )
            if n + 1 >= self._max_pages:
                break
        epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
        found.sort(key=lambda t: t.update_time or t.upload_time or epoch, reverse=True)
        return found[:limit]

    async def recent(
        self, registry_prefix: str, image: str, *, limit: int = 10, tagged_only: bool = True
    ) -> list[TaggedImage]:
        """The `limit` most recently updated versions of `image`, each with its tags."""
        from google.api_core import exceptions as api  # noqa: PLC0415
        from google.auth import exceptions as gexc  # noqa: PLC0415

        repo = ArtifactRepository.from_prefix(registry_prefix)
        client = await self._get_client()
        try:
            async with asyncio.timeout(self._timeout * (self._max_pages + 1)):
                return await asyncio.to_thread(self._list, client, repo, image, limit, tagged_only)
        # REST errors map by HTTP status (Forbidden, Unauthorized), gRPC ones by code: both can occur
        except (api.Unauthenticated, api.PermissionDenied, api.Unauthorized, api.Forbidden) as e:
            email = getattr(self._credentials, "service_account_email", None)
            who = email if isinstance(email, str) and email != "default" else "the bot's Google identity"
            raise PermanentError(
                f"Artifact Registry denied listing {repo.prefix} to {who} ({e.code} {_reason(e)})",
                hint="Grant it roles/artifactregistry.reader on this repository.",
            ) from None
        except gexc.RefreshError as e:
            # a 401 makes google-auth refresh the token; a refusal there is a credentials problem
            raise PermanentError(
                f"cannot list {repo.prefix}: the bot's Google access token was refused and could not be "
                f"refreshed ({str(e)[:200]})",
                hint="Check the service account key or the Workload Identity binding of the bot.",
            ) from None
        except api.NotFound:
            raise PermanentError(
                f"Artifact Registry repository {repo.prefix} does not exist",
                hint="Check the registry prefix in the environments file.",
            ) from None
        except (
            api.ServiceUnavailable,
            api.InternalServerError,
            api.TooManyRequests,
            api.DeadlineExceeded,
        ) as e:
            raise TransientError(
                f"Artifact Registry API unavailable for {repo.prefix}: {_reason(e)}"
            ) from None
        except TimeoutError:
            raise TransientError(f"Artifact Registry API did not answer in time for {repo.prefix}") from None
        except api.GoogleAPICallError as e:
            raise PermanentError(
                f"Artifact Registry API refused listing {repo.prefix}: {_reason(e)}"
            ) from None
        except OSError as e:  # requests' ConnectionError is an OSError
            raise TransientError(f"cannot reach the Artifact Registry API for {repo.prefix}: {e}") from None
