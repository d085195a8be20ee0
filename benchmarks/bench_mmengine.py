"""baton against mmengine on the same work: Runner, strategy, and the plain loop.

Same MLP, same synthetic tensor data, same epochs, a checkpoint every epoch:

* plain loop: hand-written PyTorch, ``torch.save`` per epoch (the baseline);
* mmengine Runner: its DataLoader (per-sample dataset, default collate), hooks and
  ``CheckpointHook`` every epoch;
* mmengine strategy: ``mmengine._strategy.SingleDeviceStrategy`` prepared, the loop by
  hand through its optim wrapper, ``save_checkpoint`` per epoch;
* baton strategy: the same loop through ``baton.SingleDeviceStrategy``.

    .venv/bin/python benchmarks/bench_mmengine.py [--epochs 3] [--samples 100000]

Target: baton strategy no slower than mmengine's strategy.
"""

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_overhead import plain_loop
from torch import nn

from baton.data import SyntheticClassification
from baton.models import MLP
from baton.randomness import seed_everything


def strategy_loop(strategy, work_dir: Path, samples: int, epochs: int) -> float:
    start = time.perf_counter()
    data = SyntheticClassification(num_samples=samples, num_features=64, num_classes=10)
    inputs, targets = data.tensors
    model, wrapper = strategy.prepare(
        MLP(64, 10, hidden=[512, 512]),
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9}},
    )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, samples, 64):
            index = order[i : i + 64]
            with wrapper.optim_context(model):
                loss = loss_fn(model(inputs[index]), targets[index])
            wrapper.update_params(loss)
        strategy.save_checkpoint(
            str(work_dir / f"epoch_{epoch + 1}.pth"), extra_ckpt={"meta": {"epoch": epoch + 1}}
        )
    return time.perf_counter() - start


def mm_runner(work_dir: Path, samples: int, epochs: int) -> float:
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = MLP(64, 10, hidden=[512, 512])
            self.loss = nn.CrossEntropyLoss()

        def forward(self, inputs, labels=None, mode="tensor"):
            out = self.net(inputs)
            return {"loss": self.loss(out, labels)} if mode == "loss" else out

    class Samples(torch.utils.data.Dataset):
        def __init__(self):
            self.inputs, self.labels = SyntheticClassification(
                num_samples=samples, num_features=64, num_classes=10
            ).tensors

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {"inputs": self.inputs[i], "labels": self.labels[i]}

    start = time.perf_counter()
    runner = Runner(
        model=Net(),
        work_dir=str(work_dir),
        train_dataloader={
            "dataset": Samples(),
            "sampler": {"type": "DefaultSampler", "shuffle": True},
            "batch_size": 64,
            "num_workers": 0,
            "collate_fn": {"type": "default_collate"},
        },
        train_cfg={"by_epoch": True, "max_epochs": epochs},
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9}},
        default_hooks={
            "checkpoint": {"type": "CheckpointHook", "interval": 1},
            "logger": {"type": "LoggerHook", "interval": 100000},
        },
        randomness={"seed": 0, "deterministic": True},
        log_level="WARNING",
    )
    runner.train()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.getLogger("mmengine").setLevel(logging.WARNING)
    from mmengine._strategy import SingleDeviceStrategy as MMStrategy

    from baton import SingleDeviceStrategy

    root = Path(tempfile.mkdtemp(prefix="baton-vs-mm-"))
    results: dict[str, list[float]] = {
        "plain loop": [],
        "mmengine Runner": [],
        "mmengine strategy": [],
        "baton strategy": [],
    }
    for repeat in range(args.repeats):
        seed_everything(0, deterministic=True)
        results["plain loop"].append(
            plain_loop(root / f"plain{repeat}", args.samples, args.epochs)[0]
        )
        results["mmengine Runner"].append(
            mm_runner(root / f"runner{repeat}", args.samples, args.epochs)
        )
        env = {"randomness": {"seed": 0, "deterministic": True}}
        mm = MMStrategy(work_dir=str(root / f"mm{repeat}"), env_kwargs=env)
        results["mmengine strategy"].append(
            strategy_loop(mm, root / f"mm{repeat}", args.samples, args.epochs)
        )
        ours = SingleDeviceStrategy(
            work_dir=str(root / f"baton{repeat}"), experiment_name="bench", env_kwargs=env
        )
        results["baton strategy"].append(
            strategy_loop(ours, root / f"baton{repeat}", args.samples, args.epochs)
        )
    best = {name: min(times) for name, times in results.items()}
    print(f"{args.epochs} epochs x {-(-args.samples // 64)} iterations, best of {args.repeats}")
    for name, value in best.items():
        print(f"  {name:18} {value:7.2f} s   ratio to plain loop {value / best['plain loop']:.3f}")
    print(
        f"  baton strategy / mmengine strategy: {best['baton strategy'] / best['mmengine strategy']:.3f} (target <= 1.0)"
    )


if __name__ == "__main__":
    main()
