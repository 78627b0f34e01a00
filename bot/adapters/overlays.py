"""Overlay text editing, deploy commit messages and the records GitOpsRepo returns (pure code, no git).

Split out of bot.adapters.gitops, which imports these back so every name is still found there. The bump
edits only the `newTag` value (and `digest:`) of the matching `images[]` entry, in place: comments, quoting,
key order, CRLF line endings and flow-style lists stay as the file's author wrote them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import yaml

from bot.errors import PermanentError
from bot.logs import redact
from bot.settings import Environment, Service

# Docker's tag grammar; anything else would need escaping in YAML and would not pull anyway.
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
# Plain scalars YAML 1.1 or 1.2 would read as something other than a string (kustomize uses 1.2).
_NOT_A_PLAIN_STRING = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|0x[0-9a-fA-F_]+|0o[0-7]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
    r"|y|Y|n|N|yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF"
    r"|null|Null|NULL|~)$"
)


# -- overlay text editing (pure functions) ---------------------------------------------------------


@dataclass(frozen=True)
class TagSpan:
    """Where the newTag value of one images[] entry sits in the file text."""

    start: int
    end: int
    value: str
    style: str | None  # '"', "'", or None for a plain scalar
    line: int  # 1-based


def find_image_tag(text: str, image: str, *, source: str) -> TagSpan:
    """Locate the `newTag` of the images[] entry named `image` (block or flow style)."""
    return _scalar_span(_image_entry(text, image, source=source), "newTag", image, source=source)


def _image_entry(text: str, image: str, *, source: str) -> yaml.MappingNode:
    """The images[] entry named `image`, as a YAML node that knows where each of its keys sits in the text."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PermanentError(
            f"{source} is not valid YAML{where}: {getattr(e, 'problem', e)}.",
            hint="Fix the overlay in the GitOps repo, then retry.",
        ) from None
    if not isinstance(root, yaml.MappingNode):
        raise PermanentError(f"{source} is not a kustomization (expected a mapping at the top level).")
    images = _mapping_get(root, "images")
    entries = images.value if isinstance(images, yaml.SequenceNode) else []
    matches: list[yaml.MappingNode] = []
    for entry in entries:
        if isinstance(entry, yaml.MappingNode):
            name = _mapping_get(entry, "name")
            if isinstance(name, yaml.ScalarNode) and name.value == image:
                matches.append(entry)
    if not matches:
        raise PermanentError(
            f"{source} has no images entry named {image!r}.",
            hint=f"Add `images: [{{name: {image}, newName: ..., newTag: ...}}]` to the overlay.",
        )
    if len(matches) > 1:
        raise PermanentError(f"{source} lists the image {image!r} {len(matches)} times; keep one entry.")
    return matches[0]


def _scalar_span(entry: yaml.MappingNode, key: str, image: str, *, source: str) -> TagSpan:
    node = _mapping_get(entry, key)
    if not isinstance(node, yaml.ScalarNode):
        raise PermanentError(
            f"{source}: the images entry {image!r} has no {key}.",
            hint="Add a newTag line to the entry so the deployed commit is pinned.",
        )
    if node.style not in (None, '"', "'"):
        raise PermanentError(f"{source}: {key} of {image!r} is a block scalar; write it on one line.")
    start, end = node.start_mark.index, node.end_mark.index
    if node.start_mark.line != node.end_mark.line:
        raise PermanentError(f"{source}: {key} of {image!r} spans several lines; write it on one line.")
    return TagSpan(start, end, str(node.value), node.style, node.start_mark.line + 1)


def _mapping_get(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            return v  # type: ignore[no-any-return]
    return None


def read_image_tag(text: str, image: str, *, source: str) -> str:
    return find_image_tag(text, image, source=source).value


def format_tag(tag: str, style: str | None) -> str:
    """The tag as a YAML scalar in the file's style; a plain tag YAML would misread gets double quotes."""
    if not _TAG_RE.match(tag):
        raise PermanentError(f"{tag!r} is not a valid image tag.")
    if style == "'":
        return f"'{tag}'"
    if style == '"' or _NOT_A_PLAIN_STRING.match(tag):
        return f'"{tag}"'
    return tag


def set_image_tag(text: str, image: str, tag: str, *, source: str) -> tuple[str, str]:
    """Return (new text, previous tag): only the newTag value's characters change."""
    span = find_image_tag(text, image, source=source)
    new = text[: span.start] + format_tag(tag, span.style) + text[span.end :]
    check = find_image_tag(new, image, source=source)
    if check.value != tag:  # pragma: no cover - a guard on the span arithmetic above
        raise PermanentError(f"{source}: editing newTag produced {check.value!r}, not {tag!r}.")
    return new, span.value


def set_image_digest(text: str, image: str, digest: str | None, *, source: str) -> str:
    """Pin the entry's image by digest (kustomize `digest:` next to `newTag`: the image renders as
    `name:tag@sha256:…`), or with None drop a digest left from before, which would otherwise keep the old
    image running under the new tag. Only that key's characters (or its line) change."""
    if digest is not None and not _DIGEST_RE.match(digest):
        raise PermanentError(f"{digest!r} is not an image digest (sha256:<64 hex>).")
    entry = _image_entry(text, image, source=source)
    existing = _mapping_get(entry, "digest")
    if existing is not None:
        span = _scalar_span(entry, "digest", image, source=source)
        if digest is not None:
            new = text[: span.start] + digest + text[span.end :]
        else:
            new = _without_key(text, entry, "digest")
    elif digest is None:
        return text
    else:
        tag = _scalar_span(entry, "newTag", image, source=source)
        key = next(k for k, _ in entry.value if isinstance(k, yaml.ScalarNode) and k.value == "newTag")
        if entry.flow_style:
            new = text[: tag.end] + f", digest: {digest}" + text[tag.end :]
        else:
            indent = " " * key.start_mark.column
            line_end = text.find("\n", tag.end)
            line_end = len(text) if line_end < 0 else line_end
            new = text[:line_end] + f"\n{indent}digest: {digest}" + text[line_end:]
    check = _mapping_get(_image_entry(new, image, source=source), "digest")
    got = check.value if isinstance(check, yaml.ScalarNode) else None
    if got != digest:  # pragma: no cover - a guard on the span arithmetic above
        raise PermanentError(f"{source}: editing the digest of {image!r} produced {got!r}, not {digest!r}.")
    return new


def _without_key(text: str, entry: yaml.MappingNode, key: str) -> str:
    for k, v in entry.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            if entry.flow_style:
                start = text.rfind(",", 0, k.start_mark.index)
                return text[: max(start, 0)] + text[v.end_mark.index :]
            line_start = text.rfind("\n", 0, k.start_mark.index) + 1
            line_end = text.find("\n", v.end_mark.index)
            return text[:line_start] + (text[line_end + 1 :] if line_end >= 0 else "")
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


@dataclass(frozen=True)
class Trailers:
    """Who and what a deploy commit is for: written as git trailers at the end of its message."""

    requester: str
    deploy_id: str
    approver: str | None = None
    override_reason: str | None = None


def commit_message(
    envs: list[Environment],
    short: str,
    *,
    requester: str,
    deploy_id: str,
    previous: dict[str, dict[Service, str]],
    approver: str | None = None,
    override_reason: str | None = None,
) -> str:
    """`deploy(<env>[, <env>]): funnelcake @ <short>`, a paragraph with the previous tags, and real git
    trailers as the last paragraph (`git interpret-trailers --parse` reads them back): Deploy-Id,
    Requested-by, Approved-by when approved, Override-Reason when a promotion gate was overridden."""
    names = [e.name for e in envs]
    lines = [f"deploy({', '.join(names)}): funnelcake @ {short}", "", "Previous tags:"]
    for name in names:
        tags = previous.get(name, {})
        lines.append(f"  {name}: " + ", ".join(f"{s.value} {tags[s]}" for s in Service if s in tags))
    lines += ["", f"Deploy-Id: {_one_line(deploy_id)}", f"Requested-by: {_one_line(requester)}"]
    if approver:
        lines.append(f"Approved-by: {_one_line(approver)}")
    if override_reason:
        lines.append(f"Override-Reason: {_one_line(override_reason)}")
    # A requester or deploy id is text from outside; a push is forever, so scrub it like a log line.
    return redact("\n".join(lines) + "\n")


# -- what the repo reports: plain records -----------------------------------------------------------

Pins = dict[tuple[str, Service], str]  # (env, service) -> the digest its entry is pinned to


@dataclass(frozen=True)
class BumpResult:
    commit: str | None  # the commit now on the remote branch; None when nothing had to change
    noop: bool
    previous: dict[str, dict[Service, str]]  # env -> service -> newTag before the bump
    attempts: int  # push attempts (0 for a noop)
    files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class OverlayCommit:
    """A commit on the remote branch that changed some env's overlay: who, what, which envs."""

    sha: str
    author: str
    email: str
    subject: str
    envs: tuple[str, ...]

    @property
    def short(self) -> str:
        return self.sha[:7]
