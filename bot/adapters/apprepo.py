"""The app repository (divine-funnelcake) as a bare mirror: resolve commits, list changes, spot migrations.

The mirror is fetched when it is older than `fetch_ttl` or when a ref is not found, so a commit
pushed a moment ago resolves without waiting for the TTL. One lock per mirror serialises git calls.
"""

from __future__ import annotations

import asyncio
import difflib
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from bot.adapters.gitutil import (
    LOCAL_TIMEOUT,
    NETWORK_TIMEOUT,
    GitCredentials,
    GitRunner,
    reject_inline_password,
    run_blocking,
)
from bot.commands.refs import is_hex_ref
from bot.errors import PermanentError

MIGRATIONS_DIR = "database/migrations/"
SHORT = 7  # image tags are the 7-char short hash, whatever git's own abbreviation would be

# Branch and tag names a person may type; anything else (options, ranges, reflog syntax) is refused.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_FIELD = "\x1f"
_RECORD = "\x1e"
_LOG_FORMAT = "%H%x1f%s%x1f%an%x1f%aI%x1e"


@dataclass(frozen=True)
class Commit:
    sha: str
    short: str
    subject: str
    author: str
    authored_at: datetime


def _parse_log(out: str) -> list[Commit]:
    commits = []
    for raw in out.split(_RECORD):
        record = raw.strip("\n")
        if not record:
            continue
        sha, subject, author, when = record.split(_FIELD)
        commits.append(Commit(sha, sha[:SHORT], subject, author, datetime.fromisoformat(when)))
    return commits


class AppRepo:
    """Read-only view of the app repo through a bare mirror kept on local disk."""

    def __init__(
        self,
        url: str,
        mirror_dir: Path,
        *,
        branch: str = "main",
        credentials: GitCredentials | None = None,
        fetch_ttl: float = 30.0,
        fetch_timeout: float = NETWORK_TIMEOUT,
    ) -> None:
        reject_inline_password(url)
        self.url = url
        self.mirror_dir = mirror_dir
        self.branch = branch
        self.fetch_ttl = fetch_ttl
        self.fetch_timeout = fetch_timeout
        self._git = GitRunner(mirror_dir, remote_url=url, credentials=credentials)
        self._lock = asyncio.Lock()
        self._fetched_at: float | None = None
        self.name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git") or url

    # -- public API ------------------------------------------------------------------------------

    async def fetch(self) -> None:
        """Bring the mirror up to date now (cloning it on first use)."""
        async with self._lock:
            await run_blocking(self._fetch)

    async def head(self) -> Commit:
        """The tip of the configured branch (what `deploy <env> main` would mean)."""
        return await self.resolve(self.branch)

    async def resolve(self, ref: str) -> Commit:
        """A commit hash (7-40 hex chars), branch or tag -> the commit; unknown or ambiguous is an error."""
        ref = ref.strip()
        if not _NAME_RE.match(ref) or ".." in ref or ref.endswith((".lock", "/", ".")):
            raise PermanentError(
                f"{ref!r} is not a commit hash, branch or tag name.",
                hint=f"Give a commit hash (at least 7 hex characters), a branch or a tag of {self.name}.",
            )
        async with self._lock:
            return await run_blocking(self._resolve, ref)

    async def commits_between(self, old_sha: str, new_sha: str, *, limit: int = 200) -> list[Commit]:
        """Commits in new_sha that old_sha lacks, newest first (at most `limit`)."""
        async with self._lock:
            return await run_blocking(self._commits_between, old_sha, new_sha, limit)

    async def count_between(self, old_sha: str, new_sha: str) -> int:
        async with self._lock:
            return await run_blocking(self._count_between, old_sha, new_sha)

    async def migrations_changed(self, old_sha: str | None, new_sha: str) -> list[str]:
        """Migration files added or changed from old_sha to new_sha (all of them when old_sha is None)."""
        async with self._lock:
            return await run_blocking(self._migrations_changed, old_sha, new_sha)

    async def is_ancestor(self, a: str, b: str) -> bool:
        async with self._lock:
            return await run_blocking(self._is_ancestor, a, b)

    # -- blocking helpers, always called with the lock held ---------------------------------------

    def _ensure_mirror(self) -> bool:
        """Create the bare mirror if needed; True when it was just created."""
        if (self.mirror_dir / "HEAD").exists():
            current = self._git.run("config", "--get", "remote.origin.url", check=False).stdout.strip()
            if current != self.url:
                self._git.run("remote", "set-url", "origin", self.url)
            return False
        self.mirror_dir.mkdir(parents=True, exist_ok=True)
        self._git.run("init", "-q", "--bare", ".")
        self._git.run("remote", "add", "origin", self.url)
        # Branches and tags only: a plain --mirror would also pull every pull-request ref.
        self._git.run("config", "--replace-all", "remote.origin.fetch", "+refs/heads/*:refs/heads/*")
        self._git.run("config", "--add", "remote.origin.fetch", "+refs/tags/*:refs/tags/*")
        return True

    def _fetch(self) -> None:
        self._ensure_mirror()
        self._git.run(
            "fetch", "--quiet", "--prune", "origin", timeout=self.fetch_timeout, what=f"Fetching {self.name}"
        )
        self._fetched_at = time.monotonic()

    def _ensure_fresh(self) -> bool:
        """Fetch when the mirror is missing or older than the TTL; True when a fetch happened."""
        if self._fetched_at is None or time.monotonic() - self._fetched_at >= self.fetch_ttl:
            self._fetch()
            return True
        return False

    def _lookup(self, ref: str) -> list[str]:
        """Full shas of the commits `ref` can name in the mirror as it is now."""
        if is_hex_ref(ref):
            ref = ref.lower()
            if len(ref) == 40:
                kind = self._git.run("cat-file", "-t", ref, check=False)
                if kind.ok and kind.stdout.strip() == "commit":
                    return [ref]
            else:
                found = self._git.run("rev-parse", f"--disambiguate={ref}", check=False)
                candidates = found.stdout.split() if found.ok else []
                commits = [c for c in candidates if self._object_type(c) == "commit"]
                if commits:
                    return sorted(commits)
        for prefix in ("refs/heads/", "refs/tags/"):
            res = self._git.run("rev-parse", "--verify", "--quiet", f"{prefix}{ref}^{{commit}}", check=False)
            if res.ok and res.stdout.strip():
                return [res.stdout.strip()]
        return []

    def _object_type(self, sha: str) -> str:
        return self._git.run("cat-file", "-t", sha, check=False).stdout.strip()

    def _commit(self, sha: str) -> Commit:
        out = self._git.run("log", "-1", "--no-walk", f"--format={_LOG_FORMAT}", sha, "--").stdout
        return _parse_log(out)[0]

    def _find(self, ref: str) -> list[str]:
        fetched = self._ensure_fresh()
        found = self._lookup(ref)
        if not found and not fetched:
            self._fetch()  # pushed after our last fetch?
            found = self._lookup(ref)
        return found

    def _resolve(self, ref: str) -> Commit:
        found = self._find(ref)
        if len(found) == 1:
            return self._commit(found[0])
        if len(found) > 1:
            raise self._ambiguous(ref, found)
        raise self._unknown(ref)

    def _full(self, sha: str) -> str:
        """A 7-40 hex sha -> the full sha of exactly one commit."""
        if not is_hex_ref(sha):
            raise PermanentError(f"{sha!r} is not a commit hash (7-40 hex characters).")
        found = self._find(sha)
        if len(found) > 1:
            raise self._ambiguous(sha, found)
        if not found:
            raise PermanentError(
                f"Commit {sha} is not in {self.name}.",
                hint="It may have been force-pushed away; deploy a commit that is on a branch.",
            )
        return found[0]

    def _ambiguous(self, ref: str, shas: list[str]) -> PermanentError:
        width = len(ref) + 1
        while len({s[:width] for s in shas}) < len(shas) and width < 40:
            width += 1
        listed = "; ".join(f"{s[:width]} {self._commit(s).subject}" for s in shas)
        return PermanentError(
            f"{ref!r} matches {len(shas)} commits in {self.name}: {listed}.",
            hint=f"Give more characters of the hash, e.g. {shas[0][:width]}.",
        )

    def _unknown(self, ref: str) -> PermanentError:
        names = self._git.run("for-each-ref", "--format=%(refname:short)", "refs/heads", "refs/tags").stdout
        pool: dict[str, str] = {n: n for n in names.split()}
        if is_hex_ref(ref) or re.fullmatch(r"[0-9a-fA-F]{4,}", ref):
            shas = self._git.run("rev-list", "--all", "--max-count=2000", check=False).stdout.split()
            for s in shas:
                # at least 7 characters: a suggestion as short as the ref typed would only echo it back
                pool.setdefault(s[: max(len(ref), 7)], s)
        close = difflib.get_close_matches(
            ref.lower() if is_hex_ref(ref) else ref, list(pool), n=5, cutoff=0.6
        )
        shown = []
        for c in close:
            target = pool[c]
            shown.append(f"{c} ({self._commit(target).subject})" if target != c else c)
        short_hint = " A hash needs at least 7 characters." if re.fullmatch(r"[0-9a-fA-F]{1,6}", ref) else ""
        hint = (
            f"Did you mean {', '.join(shown)}?" if shown else "No similar branch, tag or commit."
        ) + short_hint
        return PermanentError(
            f"{ref!r} is not a commit, branch or tag of {self.name} (fetched just now).", hint=hint
        )

    def _commits_between(self, old_sha: str, new_sha: str, limit: int) -> list[Commit]:
        old, new = self._full(old_sha), self._full(new_sha)
        out = self._git.run(
            "log",
            f"--max-count={limit}",
            f"--format={_LOG_FORMAT}",
            f"{old}..{new}",
            "--",
            timeout=LOCAL_TIMEOUT,
        ).stdout
        return _parse_log(out)

    def _count_between(self, old_sha: str, new_sha: str) -> int:
        old, new = self._full(old_sha), self._full(new_sha)
        return int(self._git.run("rev-list", "--count", f"{old}..{new}", "--").stdout.strip())

    def _migrations_changed(self, old_sha: str | None, new_sha: str) -> list[str]:
        new = self._full(new_sha)
        if old_sha is None:
            out = self._git.run("ls-tree", "-r", "--name-only", new, "--", MIGRATIONS_DIR).stdout
        else:
            old = self._full(old_sha)
            out = self._git.run(
                "diff", "--name-only", "--no-renames", "--diff-filter=AM", old, new, "--", MIGRATIONS_DIR
            ).stdout
        return sorted(p for p in out.splitlines() if p.startswith(MIGRATIONS_DIR))

    def _is_ancestor(self, a: str, b: str) -> bool:
        res = self._git.run("merge-base", "--is-ancestor", self._full(a), self._full(b), check=False)
        if res.status in (0, 1):
            return res.status == 0
        raise self._git.failure(f"Comparing {a} and {b} in {self.name}", res)
