"""Checkpoint writes at disk speed.

Writes the same state (default 1 GiB of float32 tensors) three ways, interleaved, and
prints median times and ratios:

* raw disk: the same number of bytes with one ``write`` and ``fsync``;
* ``torch.save`` into a file, then ``fsync`` (not atomic, no checksum);
* ``baton.checkpoint.io.save``: temporary file, ``fsync``, rename, directory ``fsync``,
  sha256 computed while writing.

Targets: baton at least as fast as torch.save (ratio <= 1.0), and at least 0.8 of the
raw disk's throughput.

    .venv/bin/python benchmarks/bench_checkpoint_write.py [--size-mb 1024] [--repeats 3] [--dir DIR]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from baton.checkpoint import io


def make_state(size_mb: int) -> dict[str, torch.Tensor]:
    pieces = max(1, size_mb // 64)
    numel = size_mb * (1 << 20) // 4 // pieces
    return {f"layer{i}.weight": torch.randn(numel) for i in range(pieces)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_write(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def torch_save(path: Path, state: dict) -> None:
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    state = make_state(args.size_mb)
    folder = Path(tempfile.mkdtemp(prefix="baton-bench-", dir=args.dir))
    probe = folder / "probe.pth"
    torch_save(probe, state)
    payload = os.urandom(probe.stat().st_size)
    probe.unlink()
    size_mb = len(payload) / (1 << 20)

    times: dict[str, list[float]] = {"raw disk": [], "torch.save": [], "baton": []}
    for _ in range(args.repeats):
        for name, fn in (
            ("raw disk", lambda p: raw_write(p, payload)),
            ("torch.save", lambda p: torch_save(p, state)),
            ("baton", lambda p: io.save(state, str(p))),
        ):
            path = folder / f"{name.replace(' ', '_')}.pth"
            times[name].append(timed(lambda fn=fn, path=path: fn(path)))
            path.unlink()
    folder.rmdir()

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"checkpoint of {size_mb:.0f} MiB, {args.repeats} repeats (median)")
    for name, value in medians.items():
        print(f"  {name:11} {value:7.3f} s  {size_mb / value:7.0f} MiB/s")
    print(
        f"  baton / torch.save time:          {medians['baton'] / medians['torch.save']:.3f}  (target <= 1.0)"
    )
    print(
        f"  baton / raw disk throughput:      {medians['raw disk'] / medians['baton']:.3f}  (target >= 0.8)"
    )


if __name__ == "__main__":
    main()
