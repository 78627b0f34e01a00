"""A small disk a test can fill to the last byte: a tmpfs mounted for the test (needs root, as CI and this
test bed run; the test is skipped where mounting is not allowed)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "small_disk"]


@contextlib.contextmanager
def small_disk(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`."""
    path.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=False, capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({done.stderr.decode().strip()}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk to the last byte; return the filler to delete."""
    filler = disk / "filler"
    with (
        contextlib.suppress(OSError),
        filler.open("wb", buffering=0) as f,
    ):  # unbuffered: close writes nothing
        while True:
            f.write(b"\0" * 65536)
    return filler
