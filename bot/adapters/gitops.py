"""The GitOps repo (divine-iac-coreconfig): read the deployed tags and bump them, one commit per request.

A request for several environments makes ONE commit touching each of their overlays: the history
then reads as the deploy people asked for, one push is one race to win, and a rollback is one revert.

The bump edits only the `newTag` value of the matching `images[]` entry, in place: comments,
quoting, key order, CRLF line endings and flow-style lists stay as the file's author wrote them
(no YAML round-trip). Every edited overlay is rendered with `kubectl kustomize` and must produce the
exact image reference the deploy expects before anything is committed. Pushes are never forced: a
rejected push is rebased onto the remote and retried a bounded number of times; any failure resets
the clone to the remote branch so the next deploy starts clean.
Retries: a lost push race is rebased and pushed again here (stamina); a git network failure is the
engine's to retry (see gitutil), and the registry checks before the push are the registry client's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from bot.adapters.gitutil import (
    NETWORK_TIMEOUT,
    GitCredentials,
    GitRunner,
    display_url,
    reject_inline_password,
    run_blocking,
)
from bot.adapters.kustomize import render_check
from bot.adapters.overlays import (
    BumpResult,
    OverlayCommit,
    Pins,
    Trailers,
    commit_message,
    format_tag,
    read_image_tag,
    set_image_digest,
    set_image_tag,
)
from bot.budgets import DEFAULT_TIMEOUTS
from bot.errors import BotError, PermanentError, TransientError
from bot.settings import Environment, FunnelcakeConfig, Service

log = logging.getLogger(__name__)

DEFAULT_AUTHOR = ("funnelcake-deploy-bot", "funnelcake-deploy-bot@divine.video")
RENDER_TIMEOUT = DEFAULT_TIMEOUTS.render  # `timeouts.render` in the environments file
# A bump reuses a fetch this recent (the one its deploy's resolve made to read the overlays, seconds ago)
# instead of fetching again: the push is a compare-and-swap on the branch, so a remote that moved since
# costs one rejected push and a rebase onto it, never a lost commit or an overwritten one.
FETCH_REUSE = 10.0

_PUSH_RACE_MARKERS = (
    "[rejected]",
    "fetch first",
    "non-fast-forward",
    "cannot lock ref",
    "failed to update ref",
    "incorrect old value",
    "stale info",
)


class _Rejected(Exception):
    """The remote moved on while we pushed: rebase onto it and push again."""


# -- the repo ----------------------------------------------------------------------------------------


class GitOpsRepo:
    """A working clone of the GitOps repo; one lock per clone serialises every operation on it."""

    def __init__(
        self,
        url: str,
        clone_dir: Path,
        *,
        branch: str = "main",
        credentials: GitCredentials | None = None,
        author: tuple[str, str] = DEFAULT_AUTHOR,
        signing_key: Path | None = None,
        kubectl: str = "kubectl",
        network_timeout: float = NETWORK_TIMEOUT,
        render_timeout: float = RENDER_TIMEOUT,
        retry_delay: float = 0.25,
        pin_digests: bool = False,
    ) -> None:
        reject_inline_password(url)
        self.url = url
        self.clone_dir = clone_dir
        self.branch = branch
        self.kubectl = kubectl
        self.network_timeout = network_timeout
        self.render_timeout = render_timeout
        self.retry_delay = retry_delay
        self.author = author
        self.signing_key = signing_key  # an SSH key: commits are signed with it (gpg.format=ssh)
        self.pin_digests = (
            pin_digests  # write `digest:` next to newTag: the cluster runs exactly what was checked
        )
        self._git = GitRunner(clone_dir, remote_url=url, credentials=credentials, identity=author)
        self._lock = asyncio.Lock()
        # What the clone is known to be, so a bump right after a read skips the processes that would change
        # nothing: when origin was last fetched, whether the work tree is exactly origin since, and whether
        # the clone's remote was checked against `url` (once per instance).
        self._fetched_at: float | None = None
        self._pristine = False
        self._url_checked = False
        self.name = url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git") or url

    @property
    def _origin(self) -> str:
        return f"refs/remotes/origin/{self.branch}"

    # -- public API ------------------------------------------------------------------------------

    async def read_tags(
        self, config: FunnelcakeConfig, envs: Iterable[str] | None = None
    ) -> dict[str, dict[Service, str]]:
        """env -> service -> newTag on the remote branch, after a fetch: of `envs` only (default: all).

        Raises for a broken overlay of one of those envs only: a deploy, plan or rollback of poc reads
        poc's overlays and nothing else, so a hand-broken production overlay cannot stop it."""
        chosen = [config.env(n) for n in envs] if envs is not None else config.environments
        out: dict[str, dict[Service, str]] = {}
        for name, tags in (await self.read_tags_each(chosen)).items():
            if isinstance(tags, BotError):
                raise tags
            out[name] = tags
        return out

    async def read_tags_each(self, envs: Iterable[Environment]) -> dict[str, dict[Service, str] | BotError]:
        """Like read_tags, but each env's overlays stand alone: a broken one is that env's error only.
        A fetch that fails is every env's failure (they share the repo), and raises."""
        async with self._lock:
            await run_blocking(self._sync)
            return await run_blocking(self._read_each, list(envs))

    async def tag_history(self, env: Environment, service: Service, *, limit: int = 20) -> list[str]:
        """The distinct tags the env's overlay held on the remote branch, newest first (after a fetch).

        What a rollback falls back on when the ledger knows no earlier deploy: the overlay's own history,
        including hand edits made outside the bot.
        """
        async with self._lock:
            await run_blocking(self._sync)
            return await run_blocking(self._tag_history, env, service, limit)

    def _tag_history(self, env: Environment, service: Service, limit: int) -> list[str]:
        rel, _ = self._path(env, service)
        revs = self._git.run("log", "--format=%H", f"-{limit * 3}", self._origin, "--", rel).stdout.split()
        tags: list[str] = []
        for rev in revs:
            shown = self._git.run("show", f"{rev}:{rel}", check=False)
            if not shown.ok:
                continue
            try:
                tag = read_image_tag(shown.stdout, service.image, source=f"{rel}@{rev[:7]}")
            except PermanentError:
                continue  # an old revision in another shape: not a rollback candidate
            if tag not in tags:
                tags.append(tag)
            if len(tags) >= limit:
                break
        return tags

    async def head(self) -> str:
        """The remote branch's commit, after a fetch."""
        async with self._lock:
            await run_blocking(self._sync)
            return await run_blocking(self._rev, self._origin)

    async def overlay_commits(
        self, envs: Iterable[Environment], since: str | None, *, limit: int = 20
    ) -> tuple[str, list[OverlayCommit]]:
        """The remote head (after a fetch) and the commits after `since` that touched one of the envs'
        overlay directories, oldest first (at most `limit`). `since` None, or unknown to the remote (a
        force push rewrote it): none, the head becomes the new starting point."""
        async with self._lock:
            await run_blocking(self._sync)
            return await run_blocking(self._overlay_commits, list(envs), since, limit)

    def _overlay_commits(
        self, envs: list[Environment], since: str | None, limit: int
    ) -> tuple[str, list[OverlayCommit]]:
        head = self._rev(self._origin)
        if since is None or since == head:
            return head, []
        known = self._git.run("merge-base", "--is-ancestor", since, head, check=False)
        if not known.ok:
            return head, []
        dirs = {
            env.name: sorted({str(PurePosixPath(self._path(env, s)[0]).parent) for s in Service})
            for env in envs
        }
        out = self._git.run(
            "log",
            "--reverse",
            f"-{limit}",
            "--format=%x1e%H%x1f%an%x1f%ae%x1f%s",
            "--name-only",
            f"{since}..{head}",
            "--",
            *sorted({d for ds in dirs.values() for d in ds}),
        ).stdout
        commits: list[OverlayCommit] = []
        for chunk in out.split("\x1e"):
            if not chunk.strip():
                continue
            first, *files = chunk.strip("\n").split("\n")
            sha, author, email, subject = first.split("\x1f", 3)
            touched = tuple(
                name for name, ds in dirs.items() if any(f.startswith(d + "/") for f in files for d in ds)
            )
            commits.append(OverlayCommit(sha, author, email, subject, touched))
        return head, commits

    async def bump(
        self,
        envs: list[Environment],
        short: str,
        *,
        requester: str,
        deploy_id: str,
        approver: str | None = None,
        override_reason: str | None = None,
        digests: Mapping[tuple[str, str], str] | None = None,
        max_attempts: int = 5,
    ) -> BumpResult:
        """Set newTag to `short` in every overlay of `envs`, commit once, and push (see module doc).

        With `pin_digests`, each entry also gets `digest:` from `digests` ((env, image) -> sha256:…, the
        digests the images step checked); without it a `digest:` left in an entry is removed, since it
        would keep the old image running under the new tag."""
        if not envs:
            raise PermanentError("No environment to bump.")
        format_tag(short, '"')  # validates before touching anything
        envs = list({e.name: e for e in envs}.values())
        pins = self._pins(envs, digests or {})
        async with self._lock:
            try:
                trailers = Trailers(requester, deploy_id, approver, override_reason)
                return await self._bump(envs, short, trailers, max_attempts, pins)
            except BaseException:
                with contextlib.suppress(Exception):
                    await run_blocking(self._reset_clean)
                raise

    # -- the bump, with the lock held -------------------------------------------------------------

    def _pins(self, envs: list[Environment], digests: Mapping[tuple[str, str], str]) -> Pins:
        if not self.pin_digests:
            return {}
        missing = [f"{e.name}/{s.image}" for e in envs for s in Service if (e.name, s.image) not in digests]
        if missing:
            raise PermanentError(
                f"Cannot pin {', '.join(missing)} by digest: no checked digest for it. Nothing was committed.",
                hint="The images step checks each image's digest; retry the deploy.",
            )
        return {(e.name, s): digests[(e.name, s.image)] for e in envs for s in Service}

    async def _bump(
        self, envs: list[Environment], short: str, trailers: Trailers, max_attempts: int, pins: Pins
    ) -> BumpResult:
        deploy_id = trailers.deploy_id
        await run_blocking(self._sync, FETCH_REUSE)
        previous, files = await run_blocking(self._edit, envs, short, pins)
        if not files:
            return BumpResult(commit=None, noop=True, previous=previous, attempts=0)
        await self._validate(envs, short, pins)
        message = commit_message(
            envs,
            short,
            requester=trailers.requester,
            deploy_id=deploy_id,
            previous=previous,
            approver=trailers.approver,
            override_reason=trailers.override_reason,
        )
        await run_blocking(self._commit, files, message)
        import stamina  # noqa: PLC0415 - as in the engine: `funnelcake history` reads overlays without it

        with contextlib.suppress(_Rejected):  # every push lost its race: the TransientError below
            async for attempt in stamina.retry_context(
                on=_Rejected,
                attempts=max_attempts,
                timeout=None,  # the gitops step's budget bounds the whole push
                wait_initial=self.retry_delay,
                wait_jitter=self.retry_delay,
            ):
                with attempt:
                    n = attempt.num
                    if n > 1 and not await run_blocking(self._rebase, files):
                        # Someone else pushed the same tags: the remote already says what we wanted.
                        return BumpResult(
                            commit=None, noop=True, previous=previous, attempts=n - 1, files=files
                        )
                    if n > 1:
                        await self._validate(envs, short, pins)
                    if await run_blocking(self._push):
                        sha = await run_blocking(self._rev, "HEAD")
                        extra = {"deploy_id": deploy_id, "envs": [e.name for e in envs], "attempts": n}
                        log.info("pushed %s to %s %s", sha[:7], self.name, self.branch, extra=extra)
                        return BumpResult(commit=sha, noop=False, previous=previous, attempts=n, files=files)
                    if n < max_attempts:
                        msg = "push to %s %s rejected (attempt %d of %d): rebasing onto the remote"
                        log.info(msg, self.name, self.branch, n, max_attempts, extra={"deploy_id": deploy_id})
                    raise _Rejected  # stamina's signal: rebase and push again
        raise TransientError(
            f"Pushing to {self.name} {self.branch} was rejected {max_attempts} times: other commits kept landing.",
            hint="Nothing was pushed; the deploy can be retried.",
        )

    def _path(self, env: Environment, service: Service) -> tuple[str, Path]:
        rel = env.overlays[service]
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or not rel.endswith((".yaml", ".yml")):
            raise PermanentError(
                f"Overlay path {rel!r} for {env.name}/{service.value} must be a relative path to a YAML "
                "file inside the GitOps repo."
            )
        return rel, self.clone_dir / pure

    def _read(self, env: Environment, service: Service) -> tuple[str, Path, str]:
        rel, path = self._path(env, service)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise PermanentError(
                f"{rel} ({env.name}/{service.value}) does not exist in {self.name} {self.branch}.",
                hint="Check `overlays` in the environments file.",
            ) from None
        except UnicodeDecodeError:
            raise PermanentError(f"{rel} is not UTF-8 text.") from None
        return rel, path, text

    def _read_each(self, envs: Iterable[Environment]) -> dict[str, dict[Service, str] | BotError]:
        out: dict[str, dict[Service, str] | BotError] = {}
        for env in envs:
            try:
                out[env.name] = self._read_env(env)
            except BotError as e:
                out[env.name] = e
        return out

    def _read_env(self, env: Environment) -> dict[Service, str]:
        tags: dict[Service, str] = {}
        for service in Service:
            rel, _, text = self._read(env, service)
            tags[service] = read_image_tag(text, service.image, source=rel)
        return tags

    def _edit(
        self, envs: list[Environment], short: str, pins: Pins
    ) -> tuple[dict[str, dict[Service, str]], list[str]]:
        self._pristine = False
        previous: dict[str, dict[Service, str]] = {}
        files: list[str] = []
        for env in envs:
            previous[env.name] = {}
            for service in Service:
                rel, path, text = self._read(env, service)
                new, old = set_image_tag(text, service.image, short, source=rel)
                new = set_image_digest(new, service.image, pins.get((env.name, service)), source=rel)
                previous[env.name][service] = old
                if new != text:
                    path.write_bytes(new.encode("utf-8"))
                    files.append(rel)
        return previous, files

    async def _validate(self, envs: list[Environment], short: str, pins: Pins) -> None:
        checks = []
        for env in envs:
            for service in Service:
                rel, path = self._path(env, service)
                expected = env.image_ref(service.image, short)
                if (env.name, service) in pins:
                    expected += f"@{pins[(env.name, service)]}"
                checks.append(
                    render_check(self.kubectl, rel, path.parent, expected, limit=self.render_timeout)
                )
        await asyncio.gather(*checks)

    # -- blocking git steps ------------------------------------------------------------------------

    def _sync(self, reuse: float = 0.0) -> None:
        """Clone on first use, then fetch and make the work tree exactly the remote branch. With `reuse`,
        a fetch made less than that many seconds ago stands (see FETCH_REUSE)."""
        if not (self.clone_dir / ".git").exists():
            self._pristine = False
            self.clone_dir.mkdir(parents=True, exist_ok=True)
            self._git.run(
                "clone",
                "--quiet",
                "--no-tags",
                "--single-branch",
                "--branch",
                self.branch,
                self.url,
                ".",
                timeout=self.network_timeout,
                what=f"Cloning {display_url(self.url)}",
            )
            self._fetched_at, self._url_checked = time.monotonic(), True
        else:
            if not self._url_checked:
                current = self._git.run("config", "--get", "remote.origin.url", check=False).stdout.strip()
                if current != self.url:
                    self._git.run("remote", "set-url", "origin", self.url)
                self._url_checked = True
            recent = self._fetched_at is not None and time.monotonic() - self._fetched_at < reuse
            if recent and self._pristine:
                return
            if not recent:
                self._fetch()
        self._reset_clean()

    def _fetch(self) -> None:
        self._pristine = False
        self._git.run(
            "fetch",
            "--quiet",
            "origin",
            f"+refs/heads/{self.branch}:{self._origin}",
            timeout=self.network_timeout,
            what=f"Fetching {self.name}",
        )
        self._fetched_at = time.monotonic()

    def _reset_clean(self) -> None:
        self._pristine = False
        if not (self.clone_dir / ".git").exists():
            return
        git_dir = self.clone_dir / ".git"
        if (git_dir / "rebase-merge").exists() or (git_dir / "rebase-apply").exists():
            self._git.run("rebase", "--abort", check=False)
        self._git.run("checkout", "--quiet", "--force", "-B", self.branch, self._origin)
        self._git.run("clean", "--quiet", "-fdx")
        self._pristine = True

    def _rev(self, rev: str) -> str:
        return self._git.run("rev-parse", "--verify", rev).stdout.strip()

    def _signing(self) -> list[str]:
        """`-c` options: sign with the configured SSH key, or explicitly not at all (a global
        commit.gpgsign=true without a key would fail every deploy)."""
        if self.signing_key is None:
            return ["-c", "commit.gpgsign=false"]
        return [
            "-c",
            "gpg.format=ssh",
            "-c",
            f"user.signingkey={self.signing_key}",
            "-c",
            "commit.gpgsign=true",
        ]

    def _commit(self, files: list[str], message: str) -> None:
        self._git.run("add", "--", *files)
        # --no-verify: this clone is the bot's own and `git clone` copies no hooks, so a hook here could only
        # come from the machine's global core.hooksPath, which is not the GitOps repo's policy (that runs on
        # the remote and in its CI). The overlays were already validated by rendering them with kustomize.
        self._git.run(*self._signing(), "commit", "--quiet", "--no-verify", "-m", message)

    def _push(self) -> bool:
        """True when pushed; False when the remote moved on (a race to rebase and retry)."""
        res = self._git.run(
            "push",
            "--porcelain",
            "origin",
            f"HEAD:refs/heads/{self.branch}",
            timeout=self.network_timeout,
            check=False,
        )
        if res.ok:
            return True
        if any(m in res.text for m in _PUSH_RACE_MARKERS):
            return False
        raise self._git.failure(f"Pushing to {self.name} {self.branch}", res, timeout=self.network_timeout)

    def _rebase(self, files: list[str]) -> bool:
        """pull --rebase: fetch and replay our commit; False when it became empty (already upstream)."""
        self._fetch()
        res = self._git.run(*self._signing(), "rebase", "--quiet", self._origin, check=False)
        if not res.ok:
            conflicted = self._git.run("diff", "--name-only", "--diff-filter=U", check=False).stdout.split()
            self._reset_clean()
            where = ", ".join(conflicted or files)
            raise PermanentError(
                f"Someone changed {where} in {self.name} while this deploy was pushing, and the changes "
                "conflict. Nothing was pushed.",
                hint="Look at the latest commits in the GitOps repo, then retry the deploy.",
            )
        return self._rev("HEAD") != self._rev(self._origin)
