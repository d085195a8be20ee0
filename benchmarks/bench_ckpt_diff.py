"""Peak memory of ``baton ckpt diff`` on two checkpoints of about 1 GiB each.

Writes two checkpoints in a temporary folder (``--gib`` GiB of float32 weights each:
tensors of 64 MiB and a last one of 256 MiB, which is compared in several chunks),
the second with a few elements changed in three tensors and another epoch. Then runs, each
in a fresh process, and reads that process's peak resident memory (``wait4``'s
``ru_maxrss``):

* ``python -c 'import baton.flows.cli, torch'``: the interpreter with torch, the floor;
* ``baton ckpt diff A B``: the streaming diff (memory-mapped, pages given back as they
  are compared);
* the same diff with the page release switched off (``BATON_BENCH_NO_RELEASE=1``): what
  a memory-mapped comparison costs without it;
* a whole ``torch.load`` of both files: what a naive diff holds.

Target: the diff's peak well under the two files together, about the floor plus two
chunks. The temporary files are deleted at the end.

    .venv/bin/python benchmarks/bench_ckpt_diff.py [--gib 1.0] [--dir DIR]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
PIECE = 64 * MIB  # bytes per tensor but the last

NAIVE = """
import sys, torch
a = torch.load(sys.argv[1], weights_only=True)
b = torch.load(sys.argv[2], weights_only=True)
print(sum(not torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict']))
"""

NO_RELEASE = """
import sys
from baton.checkpoint import mapped
mapped.MappedCheckpoint.release = lambda self, tensor: None
from baton.flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_pair(folder: Path, total_bytes: int) -> tuple[Path, Path]:
    """Two checkpoints of ``total_bytes`` of weights that differ in three tensors."""
    import torch

    generator = torch.Generator().manual_seed(0)
    weights, left, index = {}, total_bytes, 0
    while left > 0:
        size = PIECE if left > 4 * PIECE else left  # the last, 256 MiB, takes the rest
        weights[f"layer{index:02d}.weight"] = torch.randn(size // 4, generator=generator)
        left -= size
        index += 1
    a, b = folder / "a.pth", folder / "b.pth"
    checkpoint = {"meta": {"epoch": 1, "iter": 100}, "state_dict": weights}
    torch.save(checkpoint, a)
    names = list(weights)
    for name in (names[0], names[len(names) // 2], names[-1]):
        weights[name][-3:] += 0.5
    checkpoint["meta"]["epoch"] = 2
    torch.save(checkpoint, b)
    return a, b


def peak_rss(command: list[str], env: dict | None = None) -> tuple[int, float, int]:
    """Peak resident bytes, wall seconds and exit code of ``command`` in a new process."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss * 1024, time.perf_counter() - started, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of each checkpoint")
    parser.add_argument("--dir", default=None, help="where to write the temporary files")
    parser.add_argument("--write-into", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    total = int(args.gib * (1 << 30))
    if args.write_into:  # the child that writes the files
        write_pair(Path(args.write_into), total)
        return
    python = sys.executable
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_ckpt_diff_") as folder:
        # Written by a child: a process measured inherits its parent's memory until it
        # execs, so this one stays small (it never imports torch).
        command = [python, __file__, "--gib", str(args.gib), "--write-into", folder]
        subprocess.run(command, check=True)
        a, b = Path(folder) / "a.pth", Path(folder) / "b.pth"
        sizes = a.stat().st_size + b.stat().st_size
        runs = {
            "floor (python + torch + baton's CLI imported)": (
                [python, "-c", "import baton.flows.cli, torch"],
                None,
            ),
            "baton ckpt diff A B": (
                [python, "-m", "baton.flows.cli", "ckpt", "diff", str(a), str(b)],
                None,
            ),
            "diff without page release": (
                [python, "-c", NO_RELEASE, "ckpt", "diff", str(a), str(b)],
                None,
            ),
            "naive: torch.load both": ([python, "-c", NAIVE, str(a), str(b)], None),
        }
        print(f"checkpoints: {a.stat().st_size / MIB:.0f} MiB + {b.stat().st_size / MIB:.0f} MiB")
        print(f"{'run':48} {'peak RSS':>10} {'of files':>9} {'time':>7} {'exit':>5}")
        for label, (command, env) in runs.items():
            peak, seconds, code = peak_rss(command, env)
            print(f"{label:48} {peak / MIB:8.0f} MiB {peak / sizes:8.1%} {seconds:6.1f}s {code:5d}")
    print("temporary files deleted")


if __name__ == "__main__":
    main()
