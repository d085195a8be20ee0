"""Commit cost against the length of an experiment's history.

Builds three experiments whose manifests already hold 10, 1,000 and 10,000 committed
checkpoints (keep_last: null, so nothing rotates and every entry stays), then commits
more checkpoints to each, interleaved in a shuffled order, and prints the median commit time and its ratio
to the 10-entry experiment's, measured in the same process. Two references run beside
them: a bare durable append (one ``write`` and ``fsync`` of a journal-sized line, the
floor of any crash-safe commit) and the first manifest format's commit (the whole
manifest rewritten atomically each time). Compaction (folding the journal into a new
snapshot once it holds as many records as the snapshot has entries, at least
``COMPACT_AFTER``) is timed separately and reported per commit, amortized.

Target: commit time flat in the history length (ratio ~1.0 at 10,000 entries).

    .venv/bin/python benchmarks/bench_manifest.py [--commits 200] [--dir DIR]
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from baton.checkpoint import committed, io, manifest
from baton.checkpoint.files import ExperimentFiles
from baton.checkpoint.store import CheckpointStore

SIZES = (10, 1_000, 10_000)
DIGEST = "ab" * 32


def entry(seq: int) -> dict:
    return {
        "seq": seq,
        "path": f"checkpoints/iter_{seq:06d}.pth",
        "lineage": 1,
        "epoch": seq // 100,
        "iter": seq,
        "size": 123_456_789,
        "sha256": DIGEST,
        "metrics": {"train/loss": 0.1234, "val/accuracy": 0.9876, "val/loss": 0.2345},
        "created": 1.0,
    }


def experiment_with(root: Path, entries: int) -> CheckpointStore:
    """A store whose snapshot already holds ``entries`` committed checkpoints."""
    store = CheckpointStore(root)
    state = manifest.ManifestState()
    state.add_lineage({"id": 1, "started": 1.0, "reason": "first", "parent": None})
    for seq in range(1, entries + 1):
        state.add_entry(entry(seq))
    store.root.mkdir(parents=True)
    committed.compact(ExperimentFiles(store.root), state)
    return store


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def commit(store: CheckpointStore, number: int) -> None:
    # The manifest's cost only: the file itself is not written (commit does not read it).
    store.commit(
        str(store.checkpoint_dir / f"iter_{number:07d}.pth"),
        epoch=number // 100,
        iter=number,
        size=123_456_789,
        sha256=DIGEST,
        metrics={"train/loss": 0.1234, "val/accuracy": 0.9876},
    )


def durable_append(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_whole(path: Path, entries: list[dict]) -> None:
    """What a commit cost in the first format: the whole manifest, atomically."""
    io.write_text_atomic(path, json.dumps({"version": 1, "checkpoints": entries}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=200, help="commits timed per size")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="baton-bench-manifest-", dir=args.dir))
    stores = {n: experiment_with(folder / f"exp{n}", n) for n in SIZES}
    old_entries = {n: [entry(s) for s in range(1, n + 1)] for n in SIZES}
    line = manifest.encode_record({"op": "commit", "entry": entry(1), "drop": []})
    times: dict[str, list[float]] = {"append+fsync": []}
    times |= {f"commit at {n}": [] for n in SIZES}
    times |= {f"first format at {n}": [] for n in SIZES}
    number = 10_000_000
    order = random.Random(0)
    for _ in range(args.commits):
        times["append+fsync"].append(timed(lambda: durable_append(folder / "floor", line)))
        # a new order each round, so that no size always follows the same neighbour
        for n in order.sample(SIZES, len(SIZES)):
            number += 1
            times[f"commit at {n}"].append(timed(lambda n=n, k=number: commit(stores[n], k)))
        for n in SIZES[:2]:
            path = folder / f"old{n}.json"
            times[f"first format at {n}"].append(
                timed(lambda n=n, path=path: rewrite_whole(path, old_entries[n]))
            )
    for _ in range(3):  # the first format at 10,000 entries is slow: a few samples suffice
        path = folder / "old10000.json"
        times["first format at 10000"].append(
            timed(lambda path=path: rewrite_whole(path, old_entries[10_000]))
        )
    compaction = {}
    for n in SIZES:
        files = ExperimentFiles(stores[n].root)
        state = committed.load(files)
        compaction[n] = statistics.median(
            timed(lambda files=files, state=state: committed.compact(files, state))
            for _ in range(3)
        )

    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    base = medians["commit at 10"]
    print(f"median of {args.commits} commits per size, interleaved in a shuffled order (ms)")
    for name, value in medians.items():
        print(f"  {name:24} {value:8.3f} ms   ratio to commit at 10: {value / base:7.2f}")
    print("compaction (whole snapshot rewritten), amortized over the commits between two:")
    for n in SIZES:
        every = max(manifest.COMPACT_AFTER, n)
        print(
            f"  at {n:6d} entries: {compaction[n] * 1000:8.2f} ms every {every} commits = "
            f"{compaction[n] * 1000 / every:.4f} ms per commit"
        )
    print(
        f"  commit at 10000 / commit at 10: {medians['commit at 10000'] / base:.2f}  (target ~1.0)"
    )
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
