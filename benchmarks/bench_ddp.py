"""The training flow on 2 processes against a plain torchrun DDP script doing the same work.

Both train the same MLP on the same synthetic tensor data on 2 gloo processes (global
batches of 2 x 64), and save after every epoch (the script: ``torch.save`` of the full
state from rank 0; the flow: a sharded checkpoint, every rank writing its part, committed
atomically and verified). The flow runs on the embedded server ``baton run`` launches,
warmed up first. Repeats alternate which runs first.

    .venv/bin/python benchmarks/bench_ddp.py [--epochs 3] [--samples 100000] [--repeats 3]

Printed: per epoch, the flow's tasks (train-epoch + save-checkpoint) against the script's
epoch (training + torch.save), as the ratio of medians (target <= 1.05); the whole flow
span (first task to end, ranks' start included) against the script's wall time; the
spread of the script's own runs (the noise floor); and, from the script with ``--io``, a
sharded save and load against torch.save / torch.load of the same full state and a
background sharded save's stall as a share of a training step.
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("BATON_WORK_DIR_ROOTS", tempfile.gettempdir())

from bench_overhead import config as overhead_config

from baton.config import load_config

HERE = Path(__file__).resolve().parent


def config(work_dir: Path, samples: int, epochs: int, hidden: int) -> dict:
    """bench_overhead's pipeline (the same model, data and optimizer) on 2 processes."""
    cfg = overhead_config(work_dir, "bench-ddp", samples, epochs, hidden)
    return load_config({**cfg, "launcher": {"nproc": 2}}).model_dump(mode="json")


def plain(samples: int, epochs: int, hidden: int, io: bool = False) -> dict:
    out = Path(tempfile.mkdtemp()) / "times.json"
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(HERE / "ddp_plain.py"),
            "--samples",
            str(samples),
            "--epochs",
            str(epochs),
            "--hidden",
            str(hidden),
            "--out",
            str(out),
            *(["--io"] if io else []),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    result = json.loads(out.read_text())
    result["wall"] = time.perf_counter() - start
    shutil.rmtree(out.parent, ignore_errors=True)
    return result


async def tasks_of(flow_run_id) -> tuple[float, dict[str, float]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        flow_run = await client.read_flow_run(flow_run_id)
    runs = [r for r in runs if r.start_time]
    first = min(r.start_time for r in runs)
    took = {r.name: (r.end_time - r.start_time).total_seconds() for r in runs}
    return (flow_run.end_time - first).total_seconds(), took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from baton.flows.server import EmbeddedServer, prefect_api
    from baton.flows.train import train_pipeline

    root = Path(tempfile.mkdtemp(prefix="baton-ddp-"))
    flow_epochs, flow_spans, plain_epochs, plain_walls = [], [], [], []
    with prefect_api(EmbeddedServer()):
        train_pipeline(config=config(root / "warmup", 512, 1, args.hidden))

        def run_flow(repeat: int) -> None:
            state = train_pipeline(
                config=config(root / f"flow{repeat}", args.samples, args.epochs, args.hidden),
                return_state=True,
            )
            assert state.is_completed(), state.message
            span, took = asyncio.run(tasks_of(state.state_details.flow_run_id))
            flow_spans.append(span)
            flow_epochs.extend(
                took[f"train-epoch-{e}"] + took[f"save-checkpoint-epoch-{e}"]
                for e in range(1, args.epochs + 1)
            )

        def run_plain() -> None:
            result = plain(args.samples, args.epochs, args.hidden)
            plain_epochs.extend(result["epochs"])
            plain_walls.append(result["wall"])

        for repeat in range(args.repeats):
            if repeat % 2 == 0:
                run_plain()
                run_flow(repeat)
            else:
                run_flow(repeat)
                run_plain()
    shutil.rmtree(root, ignore_errors=True)
    io = plain(args.samples // 10, 1, 2048, io=True)

    median = statistics.median
    spread = (max(plain_epochs) - min(plain_epochs)) / median(plain_epochs)
    print(
        f"2 gloo processes, {args.epochs} epochs x {-(-args.samples // 128)} iterations, MLP "
        f"64-{args.hidden}-{args.hidden}-10, {args.repeats} repeats in alternating order"
    )
    print(f"  script epochs {[round(t, 2) for t in plain_epochs]}")
    print(f"  flow epochs   {[round(t, 2) for t in flow_epochs]}")
    print(
        f"  per epoch, ratio of medians (flow train-epoch + save-checkpoint / script epoch): "
        f"{median(flow_epochs) / median(plain_epochs):.3f} (target <= 1.05); the script's own "
        f"epochs spread over {100 * spread:.1f} % of their median"
    )
    print(
        f"  whole run, ratio of medians (flow span / script wall, both starting processes): "
        f"{median(flow_spans) / median(plain_walls):.3f}  ({median(flow_spans):.2f} s vs "
        f"{median(plain_walls):.2f} s)"
    )
    print(
        f"  MLP 64-2048-2048-10 with SGD momentum: sharded save {1000 * io['dcp_save']:.1f} ms vs "
        f"torch.save {1000 * io['torch_save']:.1f} ms ({io['dcp_save'] / io['torch_save']:.2f}x); "
        f"sharded load {1000 * io['dcp_load']:.1f} ms vs torch.load {1000 * io['torch_load']:.1f} ms "
        f"({io['dcp_load'] / io['torch_load']:.2f}x)"
    )
    print(
        f"  background sharded save: stall {1000 * io['stall']:.1f} ms = "
        f"{io['stall'] / io['step']:.2f} of a training step ({1000 * io['step']:.1f} ms)"
    )


if __name__ == "__main__":
    main()
