"""Does training run slower inside a Prefect task? The same epoch four ways, alternating,
in one process with the embedded server up: a hand-written loop, the engine's loop, the
engine's loop with an iteration hook, and the flow's ``train_epoch`` task.

    .venv/bin/python benchmarks/bench_in_task.py [--rounds 6] [--threads 1]

Prints each way's epoch times and the median ratio to the hand-written loop of the same
round.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The benchmark is the operator: its temporary experiment folders are allowed work dirs.
os.environ.setdefault("BATON_WORK_DIR_ROOTS", tempfile.gettempdir())

import torch
from bench_overhead import config
from torch import nn

from baton.config import load_config
from baton.run import pipeline as pl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=60_000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from prefect import flow

    from baton.flows.server import EmbeddedServer, prefect_api
    from baton.tasks import find_resume_point, prepare, train_epoch, validate_config

    n = args.samples
    cfg_dict = config(Path(tempfile.mkdtemp(prefix="baton-in-task-")), "e", n, 10 * args.rounds)
    pipeline = pl.build_pipeline(load_config(cfg_dict))
    inputs, targets = pipeline.train_loader.dataset.tensors
    model = pipeline.strategy.model
    optimizer = pipeline.strategy.optim_wrapper.optimizer
    loss_fn = nn.CrossEntropyLoss()

    def hand(epoch: int) -> None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, 64):
            index = order[i : i + 64]
            optimizer.zero_grad()
            loss_fn(model(inputs[index]), targets[index]).backward()
            optimizer.step()

    times: dict[str, list[float]] = {"hand": [], "engine": [], "engine+hook": [], "task": []}

    def timed(key, fn, *a, **kw):
        start = time.perf_counter()
        result = fn(*a, **kw)
        times[key].append(time.perf_counter() - start)
        return result

    @flow
    def rounds(count: int) -> None:
        cfg = validate_config(cfg_dict, None, {})
        state = prepare(cfg, find_resume_point(cfg))
        for r in range(count):
            timed("hand", hand, r)
            timed("engine", pl.train_one_epoch, pipeline)
            timed("engine+hook", pl.train_one_epoch, pipeline, on_iteration=lambda running: None)
            state = timed("task", train_epoch, cfg, state, state.epoch + 1)

    with prefect_api(EmbeddedServer()):
        rounds(args.rounds)
    print(f"{n // 64} iterations per epoch, {torch.get_num_threads()} torch threads")
    for key, values in times.items():
        ratios = sorted(v / h for v, h in zip(values, times["hand"], strict=True))
        print(
            f"  {key:12} {[round(v, 2) for v in values]}  median ratio to hand "
            f"{ratios[len(ratios) // 2]:.3f}"
        )


if __name__ == "__main__":
    main()
