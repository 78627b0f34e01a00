"""Live check of an env's site: it answers 2xx in time and, when it shows a version, shows the expected commit."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import aiohttp

from bot.errors import TransientError

_MAX_BODY = 1 << 20  # a status page is small; never read an unbounded body
_VERSION_RE = re.compile(
    r"\b(?:version|commit|build|revision|rev)\b[^0-9A-Za-z\n<]{0,5}(?:v(?=\d))?([0-9A-Za-z][0-9A-Za-z._+-]{2,63})",
    re.I,
)
_HEXISH = re.compile(r"^[0-9a-f]{7,40}$")
_TAG = re.compile(r"<[^>]+>")


@dataclass(frozen=True)
class SiteResult:
    status: Literal["ok", "skipped", "failed"]
    url: str | None
    message: str
    http_status: int | None = None
    version: str | None = None  # the version string the page shows, if any


def find_version(text: str) -> str | None:
    """The version string a page shows (`version: e7e79eb`, `Build e7e79eb`, `commit=…`), or None."""
    plain = _TAG.sub(" ", text)
    for m in _VERSION_RE.finditer(plain):
        candidate = m[1].rstrip(".-+")
        if any(ch.isdigit() for ch in candidate):
            return candidate
    return None


def version_matches(shown: str, expected_short: str) -> bool:
    shown_l, want = shown.lower(), expected_short.lower()[:7]
    if want in shown_l:
        return True
    return bool(_HEXISH.match(shown_l)) and (shown_l.startswith(want) or want.startswith(shown_l))


async def check_site(
    url: str | None,
    expected_short: str,
    *,
    session: aiohttp.ClientSession,
    limit: float = 10.0,
) -> SiteResult:
    """GET the site; 2xx and (if shown) the expected version -> ok. Unreachable/5xx -> TransientError."""
    if not url:
        return SiteResult("skipped", None, "site check skipped: no site_url configured for this environment")
    try:
        async with session.get(
            url,
            timeout=aiohttp.ClientTimeout(total=limit),
            allow_redirects=True,
            headers={"Accept": "text/html,application/json,text/plain;q=0.9,*/*;q=0.5"},
        ) as resp:
            body = await resp.content.read(_MAX_BODY)
            status = resp.status
    except (TimeoutError, aiohttp.ClientError) as e:
        raise TransientError(
            f"the site {url} did not answer within {limit:.0f}s ({type(e).__name__})",
            hint="The pods may still be warming up, or the ingress/DNS is wrong.",
        ) from None
    if status >= 500 or status == 429:
        raise TransientError(f"the site {url} answered {status}", hint="Retry shortly; check the pods' logs.")
    if not 200 <= status < 300:
        return SiteResult("failed", url, f"the site {url} answered {status}", http_status=status)
    text = body.decode("utf-8", "replace")
    if expected_short.lower()[:7] in text.lower():
        return SiteResult("ok", url, f"{url} answers and shows {expected_short}", status, expected_short)
    shown = find_version(text)
    if shown is None:
        return SiteResult("ok", url, f"{url} answers {status}; the page shows no version string", status)
    if version_matches(shown, expected_short):
        return SiteResult("ok", url, f"{url} answers and shows {shown}", status, shown)
    return SiteResult(
        "failed",
        url,
        f"{url} shows version {shown}, expected {expected_short}: the new pods are not serving the site",
        status,
        shown,
    )
