"""What exact, resumable data loading costs: baton's loader against a plain DataLoader.

Both read the same image folder (scikit-learn's digits as 16x16 PNG files, written to a
temporary folder) through the same ``ImageFolder`` and the same random augmentation
(kornia's ``RandomResizedCrop`` and a flip), with the same batch size and workers, in
this one process. The plain loader is ``torch.utils.data.DataLoader(shuffle=True,
persistent_workers=True)``; baton's seeds every sample's RNGs from (seed, epoch, index)
and keeps its workers too. Repeats alternate which runs first.

    .venv/bin/python benchmarks/bench_data.py [--workers 2] [--epochs 3] [--repeats 3]

Prints samples per second of each (over the epochs after the first, when workers are
up), their ratio (target >= 0.95), the same ratio in CPU time per sample of all
processes (which other load on the machine disturbs less than wall time), and the cost of starting workers per epoch: the wait
for an epoch's first batch (of one image, no augmentation, so that the wait is the
workers' start) when a new DataLoader is built every epoch (what baton did before)
against baton's persistent workers (what it does now).
"""

import argparse
import dataclasses
import gc
import resource
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from baton import build
from baton.data import ResumableLoader
from baton.data.example_data import write_digits_images
from baton.trust import Trust

warnings.filterwarnings("ignore", "This DataLoader will create")


def _trust(root: Path) -> Trust:
    """The benchmark's own image folder is a data root (it lives in a temporary folder)."""
    return dataclasses.replace(Trust.from_environment(), data_roots=(root.resolve(),))


def dataset(root: Path):
    return build.build(
        {
            "type": "ImageFolder",
            "root": str(root),
            "mode": "L",
            "transform": {
                "type": "Compose",
                "transforms": [
                    {"type": "RandomResizedCrop", "size": [16, 16], "scale": [0.6, 1.0]},
                    {"type": "RandomHorizontalFlip"},
                ],
            },
        },
        "dataset",
        trust=_trust(root),
    )


def timed_epochs(epochs: Iterable[Iterable]) -> list[tuple[float, float, int]]:
    """(seconds to the first batch, seconds for the epoch, samples) of each epoch."""
    results = []
    for batches in epochs:
        start = time.perf_counter()
        first, samples = None, 0
        for _, targets in batches:
            if first is None:
                first = time.perf_counter() - start
            samples += len(targets)
        results.append((first or 0.0, time.perf_counter() - start, samples))
    return results


def plain(data, batch_size: int, workers: int, epochs: int, *, persistent: bool):
    generator = torch.Generator().manual_seed(0)

    def build():
        return DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            generator=generator,
        )

    loader = build()
    return timed_epochs(loader if persistent else build() for _ in range(epochs))


def baton_loader(data, batch_size: int, workers: int, epochs: int):
    loader = ResumableLoader(data, batch_size, seed=0, num_workers=workers)
    try:
        return timed_epochs(loader.iter_epoch(e) for e in range(1, epochs + 1))
    finally:
        loader.close()


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the workers, once joined)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rate(results) -> float:
    steady = results[1:] or results
    return sum(s for _, _, s in steady) / sum(t for _, t, _ in steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(write_digits_images(Path(tmp) / "digits") / "train")
        run = (data, args.batch_size, args.workers, args.epochs)
        ratios, plain_rates, baton_rates, cpu_ratios = [], [], [], []
        for repeat in range(args.repeats):
            order = ("plain", "baton") if repeat % 2 == 0 else ("baton", "plain")
            got, cpu = {}, {}
            for name in order:
                start = cpu_seconds()
                got[name] = plain(*run, persistent=True) if name == "plain" else baton_loader(*run)
                gc.collect()  # the plain loader's workers are joined when it is freed
                cpu[name] = (cpu_seconds() - start) / sum(s for _, _, s in got[name])
            plain_rates.append(rate(got["plain"]))
            baton_rates.append(rate(got["baton"]))
            ratios.append(baton_rates[-1] / plain_rates[-1])
            cpu_ratios.append(cpu["plain"] / cpu["baton"])
            print(
                f"repeat {repeat + 1}: plain {plain_rates[-1]:.0f} samples/s, "
                f"baton {baton_rates[-1]:.0f} samples/s, ratio {ratios[-1]:.3f}; CPU per "
                f"sample plain {1000 * cpu['plain']:.3f} ms, baton {1000 * cpu['baton']:.3f} ms"
            )
        bare = build.build(
            {"type": "ImageFolder", "root": str(data.root), "mode": "L"},
            "dataset",
            trust=_trust(Path(data.root)),
        )
        fresh = plain(bare, 1, args.workers, args.epochs, persistent=False)
        kept = baton_loader(bare, 1, args.workers, args.epochs)
    print(
        f"\n{len(data)} samples, batch {args.batch_size}, {args.workers} workers, "
        f"{args.epochs} epochs, {args.repeats} repeats"
    )
    print(f"plain DataLoader: {statistics.median(plain_rates):.0f} samples/s (median)")
    print(f"baton loader:     {statistics.median(baton_rates):.0f} samples/s (median)")
    print(f"ratio baton/plain (median of paired ratios): {statistics.median(ratios):.3f}")
    print(
        "CPU-time ratio plain/baton per sample, all processes (median; robust to a busy "
        f"machine): {statistics.median(cpu_ratios):.3f}"
    )
    before = [first for first, _, _ in fresh[1:]]
    after = [first for first, _, _ in kept[1:]]
    print(
        "worker start per epoch (wait for the first batch of one image, epochs 2+): new "
        f"workers every epoch {1000 * statistics.median(before):.1f} ms, persistent workers "
        f"{1000 * statistics.median(after):.1f} ms (their first epoch: {1000 * kept[0][0]:.1f} ms)"
    )


if __name__ == "__main__":
    main()
