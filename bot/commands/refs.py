"""What the bot accepts as a commit: a hash of 7 to 40 hex characters or a git branch/tag name it can show.

One rule for the command grammar (Slack and the CLI) and the git adapter. Pure code, no I/O.
"""

from __future__ import annotations

import re

MAX_REF_LENGTH = 100
_HEX = re.compile(r"^[0-9a-fA-F]+$")
_FORBIDDEN_REF_CHARS = "~^:?*[\\"
# Legal in git but the ref is echoed in mrkdwn and commit messages; no real branch needs them.
_UNSHOWABLE_REF_CHARS = "<>`"

REF_FORMS = (
    "a commit hash of 7 to 40 hex characters (e.g. `e7e79eb`) or a branch or tag name "
    f"(e.g. `main`, `v1.4.2`: no spaces, `..`, `~ ^ : ? * [ \\`, no leading `-`, at most {MAX_REF_LENGTH} characters)"
)


def ref_problem(ref: str) -> str | None:
    """Why `ref` is neither a commit hash nor a valid git branch/tag name; None when it is fine."""
    if not ref:
        return "it is empty"
    if len(ref) > MAX_REF_LENGTH:
        return f"it is longer than {MAX_REF_LENGTH} characters"
    if is_hex(ref) and re.search(r"[0-9]", ref) and re.search(r"[a-fA-F]", ref):
        # A branch named like a 4-6 character hash is far less likely than a hash cut short.
        if 4 <= len(ref) < 7:
            return f"it looks like a commit hash but has only {len(ref)} characters; give at least 7"
        if len(ref) > 40:
            return f"it looks like a commit hash but has {len(ref)} characters; a hash has at most 40"
    if is_hex_ref(ref):
        return None
    if any(not c.isprintable() or c.isspace() for c in ref):
        return "it contains a space or a control character"
    bad = sorted({c for c in ref if c in _FORBIDDEN_REF_CHARS})
    if bad:
        return f"git does not allow {' '.join(bad)} in a ref name"
    if any(c in _UNSHOWABLE_REF_CHARS for c in ref):
        return "it contains `<`, `>` or a backtick, which would garble the Slack messages that show it"
    if ".." in ref:
        return "git does not allow `..` in a ref name"
    if ref.startswith("-"):
        return "it starts with `-`"
    if ref == "@" or "@{" in ref:
        return "git does not allow `@` alone or `@{` in a ref name"
    if ref.startswith("/") or ref.endswith("/") or "//" in ref:
        return "it has an empty part between slashes"
    if ref.endswith("."):
        return "it ends with `.`"
    for part in ref.split("/"):
        if part.startswith("."):
            return "a part of it starts with `.`"
        if part.endswith(".lock"):
            return "a part of it ends with `.lock`"
    return None


def is_valid_ref(ref: str) -> bool:
    """A commit hash or a branch/tag name the bot may use."""
    return ref_problem(ref) is None


def is_hex(text: str) -> bool:
    """Only hex digits, of any length: what a commit hash, whole or cut short, looks like."""
    return bool(_HEX.match(text))


def is_hex_ref(ref: str) -> bool:
    """A commit hash, abbreviated or full (7 to 40 hex characters), rather than a branch or tag name."""
    return is_hex(ref) and 7 <= len(ref) <= 40
