"""Resume cost: from a checkpoint on disk to a model and optimizer ready to train.

Baseline: build the model and optimizer, ``torch.load`` the file, ``load_state_dict``
both. baton: build a strategy, ``prepare`` and ``resume`` (safe loading, key revision,
shape checks, RNG states, schedulers, position). Same file, interleaved, medians.

    .venv/bin/python benchmarks/bench_resume.py [--hidden 4096] [--repeats 5]

Target: baton / baseline <= 1.2.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from baton import SingleDeviceStrategy
from baton.models import MLP


def build(hidden: int) -> MLP:
    return MLP(1024, 10, hidden=[hidden, hidden, hidden])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="baton-resume-"))
    optim = {"optimizer": {"type": "AdamW", "lr": 1e-3}}

    writer = SingleDeviceStrategy(
        work_dir=str(root), experiment_name="bench", env_kwargs={"randomness": {"seed": 0}}
    )
    model, wrapper = writer.prepare(build(args.hidden), optim_wrapper=optim)
    model(torch.randn(4, 1024)).sum().backward()
    wrapper.step()
    ref = writer.save_checkpoint("epoch_0001.pth")
    size_mb = ref.size / (1 << 20)

    def baseline() -> None:
        model = build(args.hidden)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        checkpoint = torch.load(ref.uri, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])

    def ours() -> None:
        strategy = SingleDeviceStrategy(
            work_dir=str(root), experiment_name="bench", env_kwargs={"randomness": {"seed": 0}}
        )
        strategy.prepare(build(args.hidden), optim_wrapper=optim)
        strategy.resume(ref.uri)

    times: dict[str, list[float]] = {"baseline": [], "baton": []}
    for _ in range(args.repeats):
        for name, fn in (("baseline", baseline), ("baton", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base, mine = statistics.median(times["baseline"]), statistics.median(times["baton"])
    print(f"resume of a {size_mb:.0f} MiB checkpoint (MLP, AdamW state), median of {args.repeats}")
    print(f"  build + torch.load + load_state_dict   {base:6.3f} s")
    print(f"  baton prepare + resume                 {mine:6.3f} s")
    print(f"  ratio {mine / base:.3f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
