"""Benchmark: our registry-to-registry promotion against `skopeo copy --all`, its memory on 1 GB, and a repromote.

Run standalone: `.venv/bin/python bench/promote.py`. Starts local docker-registry processes, pushes
synthetic images, and prints its figures; the last line is
`promote ratio_vs_skopeo=<x> rss_mib_1g=<y> repromote_ms=<z>` (targets: <= 1.0, <= 64, <= 50).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
SMALL = (50 * MIB,) * 4  # 200 MB in 4 layers
LARGE = (256 * MIB,) * 4  # 1 GB in 4 layers
RUNS = 3


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def _child(src: str, dst: str, image: str, tag: str) -> None:
    """Promote in this (fresh) process and report its peak memory, so only the copy is measured."""
    from bot.adapters.registry import RegistryClient  # noqa: PLC0415 - measured process imports only this

    async with RegistryClient() as rc:
        result = await rc.promote(src, dst, image, tag)
    print(
        f"child bytes={result.bytes_copied} vmhwm_kib={_vm_hwm_kib()} "
        f"maxrss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}"
    )


async def _ours(src: str, dst: str, image: str, tag: str) -> float:
    from bot.adapters.registry import RegistryClient  # noqa: PLC0415

    started = time.perf_counter()
    async with RegistryClient() as rc:
        result = await rc.promote(src, dst, image, tag)
    elapsed = time.perf_counter() - started
    assert not result.noop
    assert result.bytes_copied >= sum(SMALL)
    return elapsed


async def _skopeo(src_ref: str, dst_ref: str) -> float:
    # a fresh HOME per run keeps skopeo's per-user state out of the comparison
    with tempfile.TemporaryDirectory(prefix="skopeo-home-") as home:
        env = {**os.environ, "HOME": home, "XDG_DATA_HOME": f"{home}/data", "XDG_CONFIG_HOME": f"{home}/cfg"}
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "skopeo",
            "copy",
            "--all",
            "--insecure-policy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            f"docker://{src_ref}",
            f"docker://{dst_ref}",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 600)
        elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo copy failed: {err.decode()[-500:]}")
    return elapsed


async def _rss_child(src: str, dst: str, image: str, tag: str) -> tuple[float, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--child",
        src,
        dst,
        image,
        tag,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 900)
    if proc.returncode != 0:
        raise RuntimeError(f"child promote failed: {err.decode()[-1000:]}")
    line = out.decode().strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in line.split()[1:])
    return int(fields["vmhwm_kib"]) / 1024, int(fields["maxrss_kib"]) / 1024


async def main() -> None:
    from bot.adapters.registry import RegistryClient  # noqa: PLC0415
    from tests.testbed.registry import LocalRegistry, push_image  # noqa: PLC0415

    async with LocalRegistry("bench-src") as src, LocalRegistry("bench-dst") as dst:
        t0 = time.perf_counter()
        await push_image(src.url, "bench/src/small", "t", "amd64", layer_sizes=SMALL, seed="bench-small")
        print(f"pushed 200 MB image in {time.perf_counter() - t0:.1f}s")
        src_prefix = f"{src.host}/bench/src"

        ours, theirs = [], []
        for run in range(RUNS):
            # a fresh destination registry per copy: neither side may find blobs from an earlier run
            # (skopeo remembers blob locations in a cache outside our control and would mount them)
            async with LocalRegistry(f"bench-ours-{run}") as fresh:
                ours.append(await _ours(src_prefix, f"{fresh.host}/ours", "small", "t"))
            async with LocalRegistry(f"bench-skopeo-{run}") as fresh:
                theirs.append(await _skopeo(f"{src.host}/bench/src/small:t", f"{fresh.host}/skopeo/small:t"))
            print(f"run {run}: ours {ours[-1]:.2f}s  skopeo {theirs[-1]:.2f}s")
        await _ours(src_prefix, f"{dst.host}/ours0", "small", "t")
        ratio = min(ours) / min(theirs)
        print(
            f"200 MB: ours best {min(ours):.2f}s ({sum(SMALL) / MIB / min(ours):.0f} MiB/s), "
            f"skopeo best {min(theirs):.2f}s"
        )

        repromote = []
        for _ in range(7):
            started = time.perf_counter()
            async with RegistryClient() as rc:
                result = await rc.promote(src_prefix, f"{dst.host}/ours0", "small", "t")
            repromote.append((time.perf_counter() - started) * 1000)
            assert result.noop
        repromote_ms = statistics.median(repromote)
        print(
            f"repromote (fresh client each time): median {repromote_ms:.1f} ms, min {min(repromote):.1f} ms"
        )

        t0 = time.perf_counter()
        await push_image(src.url, "bench/src/large", "t", "amd64", layer_sizes=LARGE, seed="bench-large")
        print(f"pushed 1 GB image in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        hwm, maxrss = await _rss_child(src_prefix, f"{dst.host}/large", "large", "t")
        print(
            f"1 GB promote in a child process: {time.perf_counter() - t0:.1f}s, "
            f"VmHWM {hwm:.1f} MiB, ru_maxrss {maxrss:.1f} MiB"
        )

    print(f"promote ratio_vs_skopeo={ratio:.2f} rss_mib_1g={hwm:.1f} repromote_ms={repromote_ms:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=4, metavar=("SRC", "DST", "IMAGE", "TAG"))
    args = parser.parse_args()
    if args.child:
        asyncio.run(_child(*args.child))
    else:
        asyncio.run(main())
