"""The baseline of bench_ddp.py: a plain torchrun DDP script doing the flow's work.

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/ddp_plain.py \
        --samples 100000 --epochs 3 --out times.json [--io]

What a user writes by hand: the same MLP and synthetic data, each global batch of 64 per
process split across the processes, SGD, a ``torch.save`` of the full state from rank 0
after every epoch. Rank 0 writes the epochs' times to ``--out``. With ``--io`` it then
times a sharded save and load (baton's, through DCP) against ``torch.save`` /
``torch.load`` of the same full state, and a background sharded save's stall against a
training step.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from baton.checkpoint import io, sharded
from baton.data import SyntheticClassification
from baton.models import MLP


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--out", required=True)
    parser.add_argument("--io", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = SyntheticClassification(num_samples=args.samples, num_features=64, num_classes=10)
    inputs, targets = data.tensors
    model = DistributedDataParallel(MLP(64, 10, hidden=[args.hidden, args.hidden]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    batch = 64 * world
    epochs = []
    folder = Path(tempfile.mkdtemp(prefix="ddp-plain-")) if rank == 0 else None
    for epoch in range(args.epochs):
        start = time.perf_counter()
        order = torch.randperm(args.samples, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, args.samples, batch):
            index = order[i : i + batch][rank::world]
            optimizer.zero_grad()
            loss_fn(model(inputs[index]), targets[index]).backward()
            optimizer.step()
        if rank == 0:
            torch.save(
                {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()},
                folder / f"epoch_{epoch}.pth",
            )
        dist.barrier()
        epochs.append(time.perf_counter() - start)
    result = {"epochs": epochs, "startup": started}
    if args.io:
        result.update(io_times(model, optimizer, inputs, targets, loss_fn, rank, world))
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()


def io_times(model, optimizer, inputs, targets, loss_fn, rank, world) -> dict:
    """Sharded save and load (every rank) against torch.save and torch.load (rank 0) of
    the same full state, and a background save's stall against a training step."""
    state = {"state_dict": model.module.state_dict(), "optimizer": optimizer.state_dict()}
    group = dist.new_group(backend="gloo")
    root = Path(tempfile.gettempdir()) / f"ddp-io-{os.getppid()}"
    root.mkdir(exist_ok=True)
    times: dict[str, list[float]] = {
        k: [] for k in ("dcp_save", "dcp_load", "torch_save", "torch_load", "stall", "step")
    }
    for repeat in range(3):
        target = root / f"r{repeat}.dcp"
        dist.barrier()
        start = time.perf_counter()
        sharded.write(
            state,
            sharded.writing_folder(target),
            save_skeleton=lambda s, p: io.save(s, str(p)),
            process_group=group,
            coordinator=rank == 0,
        )
        if rank == 0:
            sharded.publish(sharded.writing_folder(target), target)
        dist.barrier()
        times["dcp_save"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sharded.read(target, load_skeleton=lambda p: io.load(str(p)))
        dist.barrier()
        times["dcp_load"].append(time.perf_counter() - start)
        if rank == 0:
            start = time.perf_counter()
            io.save(state, str(root / f"r{repeat}.pth"))
            times["torch_save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.load(root / f"r{repeat}.pth", weights_only=True)
            times["torch_load"].append(time.perf_counter() - start)
        dist.barrier()
        # The stall of a background save: staging to CPU memory, then training goes on.
        start = time.perf_counter()
        pending = sharded.write(
            state,
            sharded.writing_folder(root / f"a{repeat}.dcp"),
            save_skeleton=lambda s, p: io.save(s, str(p)),
            process_group=group,
            coordinator=rank == 0,
            background=True,
        )
        times["stall"].append(time.perf_counter() - start)
        index = torch.arange(64)
        for _ in range(20):
            start = time.perf_counter()
            optimizer.zero_grad()
            loss_fn(model(inputs[index]), targets[index]).backward()
            optimizer.step()
            times["step"].append(time.perf_counter() - start)
        pending.result()
        dist.barrier()
    if rank == 0:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return {k: statistics.median(v) for k, v in times.items() if v}


if __name__ == "__main__":
    main()
