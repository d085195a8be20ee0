"""Saves that do not stall training: background save against a synchronous one.

The same 1 GiB state (a linear layer plus its AdamW state) is saved synchronously and in
the background; after the background call returns, "training" changes every weight
(which makes the copy-on-write snapshot pay for the pages it touches). Prints the stall
(how long the training loop waits) as a share of the synchronous save, and the memory
the background save added (the writer process's peak RSS above the shared pages is not
visible here, so the parent's RSS growth is reported along with the child's peak RSS).

    .venv/bin/python benchmarks/bench_async_save.py [--size-mb 1024] [--repeats 3]

Targets: stall <= 10 % of the synchronous save; extra memory <= one copy of the state.
"""

import argparse
import resource
import statistics
import tempfile
import time

import torch
from torch import nn

from baton import SingleDeviceStrategy


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # weight + AdamW's two moments: three tensors of the layer's size
    features = int((args.size_mb * (1 << 20) / 4 / 3) ** 0.5)
    strategy = SingleDeviceStrategy(
        work_dir=tempfile.mkdtemp(prefix="baton-async-"),
        experiment_name="bench",
        env_kwargs={"randomness": {"seed": 0}},
    )
    model, wrapper = strategy.prepare(
        nn.Linear(features, features, bias=False),
        optim_wrapper={"optimizer": {"type": "AdamW", "lr": 1e-3}},
    )
    model(torch.randn(2, features)).sum().backward()
    wrapper.step()

    sync_times, stalls, totals, rss_growth = [], [], [], []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        strategy.save_checkpoint(f"sync_{repeat}.pth")
        sync_times.append(time.perf_counter() - start)

        before = rss_mb()
        start = time.perf_counter()
        future = strategy.save_checkpoint_async(f"async_{repeat}.pth")
        stalls.append(time.perf_counter() - start)
        with torch.no_grad():
            for param in model.parameters():  # training goes on and touches every page
                param.add_(1e-6)
        rss_growth.append(rss_mb() - before)
        ref = future.result()
        totals.append(time.perf_counter() - start)
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    state_mb = ref.size / (1 << 20)
    sync, stall = statistics.median(sync_times), statistics.median(stalls)
    print(f"state of {state_mb:.0f} MiB, median of {args.repeats}")
    print(f"  synchronous save          {sync:7.3f} s")
    print(
        f"  background save: stall    {stall:7.3f} s   {100 * stall / sync:5.1f} % of synchronous (target <= 10 %)"
    )
    print(f"  background save: total    {statistics.median(totals):7.3f} s")
    print(
        f"  parent RSS growth while writing {statistics.median(rss_growth):7.0f} MiB (copy-on-write pages)"
    )
    print(
        f"  writer process peak RSS         {child_peak:7.0f} MiB (mostly pages shared with the parent)"
    )
    print(f"  target: extra memory <= one copy of the state ({state_mb:.0f} MiB)")


if __name__ == "__main__":
    main()
