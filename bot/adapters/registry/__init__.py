"""OCI distribution client for every registry: tag checks with real platforms, and digest-preserving promotion.

One client talks to all three environments' registries (Artifact Registry in production, Debian
docker-registry in the test bed). It never deletes anything.

Layers, each importing only those before it: `credentials` (who we are to each host), `wire` (the
retry signal and the status mapping every answer goes through), `auth` (token auth and its cache),
`client` (request primitives, manifests, blobs, tag checks) and `promote` (RegistryClient, with
promotion). Everything importable from the one-module client is re-exported here.
"""

from bot.adapters.registry.client import (
    ACCEPT,
    DEFAULT_INSECURE_HOSTS,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageStatus,
    RegistryUnavailable,
)
from bot.adapters.registry.credentials import (
    ACCESS_TOKEN_USER,
    CLOUD_PLATFORM_SCOPE,
    Anonymous,
    BasicCredentials,
    Credentials,
    DefaultCredentials,
    GoogleAccessToken,
    is_artifact_registry,
)
from bot.adapters.registry.promote import CHUNK, PromoteProgress, PromoteResult, RegistryClient
from bot.adapters.registry.wire import retry_after

__all__ = [
    "ACCEPT",
    "ACCESS_TOKEN_USER",
    "CHUNK",
    "CLOUD_PLATFORM_SCOPE",
    "DEFAULT_INSECURE_HOSTS",
    "DOCKER_LIST",
    "DOCKER_MANIFEST",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Anonymous",
    "BasicCredentials",
    "Credentials",
    "DefaultCredentials",
    "GoogleAccessToken",
    "ImageStatus",
    "PromoteProgress",
    "PromoteResult",
    "RegistryClient",
    "RegistryUnavailable",
    "is_artifact_registry",
    "retry_after",
]
