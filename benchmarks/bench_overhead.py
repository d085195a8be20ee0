"""What restartability costs: the training flow against a plain PyTorch loop.

Both train the same MLP on the same synthetic tensor data (about 2 s per epoch here),
same seed, same epochs, and save a checkpoint after every epoch (the loop with a plain
``torch.save``; the flow atomically, fsynced, checksummed, with artifacts). The flow runs
on the embedded server ``baton run`` launches, warmed up by a first flow before timing;
its "span" runs from the first task's start to the end of the flow run, its "call" is the
whole flow call.

    .venv/bin/python benchmarks/bench_overhead.py [--epochs 5] [--samples 100000]
        [--threads N] [--api-url URL] [--in-flow-process]

The plain loop runs in a process of its own, as a user's script does (its imports not
timed). Targets: the flow's epochs (train-epoch and save-checkpoint tasks) and its whole
span at most 1.02x the plain loop's, read as the ratio of medians over repeats that
alternate which runs first; the plain loop's own spread is printed as the noise. The
per-epoch fixed cost and where it goes (a task run in this process and on the server, an
artifact, a checkpoint save against torch.save, the server's CPU while the flow trains)
are printed too.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _threads_from_command_line() -> str | None:
    """``--threads N``, read before torch is imported: torch takes it from the environment,
    so that this process never starts OpenMP workers (the flow forks its training process
    from this one, and does not where OpenMP's workers run: baton.run.own_process)."""
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return None


if _threads_from_command_line():
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads_from_command_line()
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The benchmark is the operator: its temporary experiment folders are allowed work dirs.
os.environ.setdefault("BATON_WORK_DIR_ROOTS", tempfile.gettempdir())

import torch  # noqa: E402 (imported after --threads is in the environment)
from torch import nn  # noqa: E402

from baton.config import load_config  # noqa: E402
from baton.data import SyntheticClassification  # noqa: E402
from baton.models import MLP  # noqa: E402
from baton.randomness import seed_everything  # noqa: E402
from baton.run import pipeline as pl  # noqa: E402


def config(
    work_dir: Path,
    name: str,
    samples: int,
    epochs: int,
    hidden: int = 512,
    interval_iters: int | None = None,
    async_save: bool = False,
) -> dict:
    return load_config(
        {
            "experiment_name": name,
            "work_dir": str(work_dir),
            "randomness": {"seed": 0, "deterministic": True},
            "model": {
                "type": "MLP",
                "in_features": 64,
                "num_classes": 10,
                "hidden": [hidden, hidden],
            },
            "train_data": {
                "dataset": {
                    "type": "SyntheticClassification",
                    "num_samples": samples,
                    "num_features": 64,
                    "num_classes": 10,
                },
                "batch_size": 64,
            },
            "optim_wrapper": {"optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9}},
            "train": {"max_epochs": epochs, "log_interval": 1000},
            "checkpoint": {
                "keep_last": None,
                "interval_iters": interval_iters,
                "async_save": async_save,
            },
        }
    ).model_dump(mode="json")


def plain_loop(
    work_dir: Path,
    samples: int,
    epochs: int,
    hidden: int = 512,
    interval_iters: int | None = None,
) -> tuple[float, list[float]]:
    """The baseline: what a user would write by hand (saving where the flow saves). Its
    whole time, and each epoch's (with its save)."""
    start = time.perf_counter()
    epoch_times = []
    seed_everything(0, deterministic=True)
    data = SyntheticClassification(num_samples=samples, num_features=64, num_classes=10)
    inputs, targets = data.tensors
    model = MLP(64, 10, hidden=[hidden, hidden])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    work_dir.mkdir(parents=True, exist_ok=True)
    iteration = 0
    for epoch in range(epochs):
        epoch_start = time.perf_counter()
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, samples, 64):
            index = order[i : i + 64]
            optimizer.zero_grad()
            loss_fn(model(inputs[index]), targets[index]).backward()
            optimizer.step()
            iteration += 1
            if interval_iters and iteration % interval_iters == 0 and i + 64 < samples:
                torch.save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                    work_dir / f"iter_{iteration}.pth",
                )
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
            work_dir / f"epoch_{epoch}.pth",
        )
        epoch_times.append(time.perf_counter() - epoch_start)
    return time.perf_counter() - start, epoch_times


def plain_script(work_dir: Path, args) -> tuple[float, list[float]]:
    """:func:`plain_loop` in a new interpreter, as a user's script runs (its start and
    imports not timed): torch's threads in this process stay untouched."""
    command = [
        sys.executable,
        __file__,
        "--plain-loop",
        str(work_dir),
        "--samples",
        str(args.samples),
    ]
    command += ["--epochs", str(args.epochs), "--hidden", str(args.hidden)]
    if args.interval_iters:
        command += ["--interval-iters", str(args.interval_iters)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    total, epochs = json.loads(out.strip().splitlines()[-1])
    return total, epochs


async def task_span(flow_run_id) -> tuple[float, list[str], list[float]]:
    """From the start of the flow's first task run to the end of the flow run, where
    that time went (each task run's duration and the gap before it: flow code between
    tasks), and each epoch's time (its train-epoch and save-checkpoint tasks and the gaps
    before them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        flow_run = await client.read_flow_run(flow_run_id)
    runs = sorted((r for r in runs if r.start_time), key=lambda r: r.start_time)
    lines, previous, epochs = [], None, []
    for r in runs:
        gap = (r.start_time - previous).total_seconds() * 1000 if previous else 0.0
        took = (r.end_time - r.start_time).total_seconds() * 1000
        lines.append(f"    {r.name:28} {took:9.1f} ms   gap before {gap:6.1f} ms")
        previous = r.end_time
        if r.name.startswith("train-epoch-"):
            epochs.append(0.0)
        if epochs and r.name.startswith(("train-epoch-", "save-checkpoint-epoch-")):
            epochs[-1] += (took + gap) / 1000
    tail = (flow_run.end_time - previous).total_seconds() * 1000
    lines.append(f"    {'(after the last task)':28} {tail:9.1f} ms")
    return (flow_run.end_time - runs[0].start_time).total_seconds(), lines, epochs


# The embedded server's CPU use while nothing runs (its services poll), per second.
IDLE_SERVER_CPU = 0.02


def server_cpu_seconds() -> float:
    """CPU time used so far by this process's children (Prefect's embedded server)."""
    total, me, tick = 0.0, os.getpid(), os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def micro_costs(work_dir: Path) -> dict[str, float]:
    """Per-operation costs, in ms, measured in this process."""
    from prefect import flow, task
    from prefect.artifacts import create_table_artifact

    @task
    def empty() -> None:
        return None

    @task
    def artifact(i: int) -> None:
        create_table_artifact(key="bench-table", table=[{"epoch": i, "loss": 0.1}])

    @flow
    def probe(n: int) -> tuple[float, float, float]:
        empty()
        cpu = server_cpu_seconds()
        start = time.perf_counter()
        for _ in range(n):
            empty()
        per_task = (time.perf_counter() - start) / n
        time.sleep(3)  # the server records the task runs' events in batches
        server_per_task = (server_cpu_seconds() - cpu - 3 * IDLE_SERVER_CPU) / n
        start = time.perf_counter()
        for i in range(n):
            artifact(i)
        per_artifact = (time.perf_counter() - start) / n - per_task
        return per_task, server_per_task, per_artifact

    per_task, server_per_task, per_artifact = probe(20)
    cfg = load_config(config(work_dir, "micro", 1024, 1))
    pipeline = pl.build_pipeline(cfg)
    start = time.perf_counter()
    for _ in range(5):
        pl.save(pipeline, {})
    ours = (time.perf_counter() - start) / 5
    model, optimizer = pipeline.strategy.model, pipeline.strategy.optim_wrapper.optimizer
    start = time.perf_counter()
    for i in range(5):
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
            work_dir / f"plain_{i}.pth",
        )
    plain = (time.perf_counter() - start) / 5
    return {
        "empty task run (client)": 1000 * per_task,
        "empty task run (server CPU)": 1000 * server_per_task,
        "table artifact": 1000 * per_artifact,
        "baton checkpoint save": 1000 * ours,
        "torch.save of the same": 1000 * plain,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512, help="width of the two hidden layers")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, one per core; 1 leaves a core for the rest, "
        "as on a GPU host whose CPU does not train)",
    )
    parser.add_argument(
        "--interval-iters", type=int, default=None, help="also checkpoint every N iterations"
    )
    parser.add_argument(
        "--api-url",
        default=None,
        help="an external Prefect server's API (e.g. http://127.0.0.1:4200/api, started "
        "with `prefect server start`); default: the embedded server `baton run` launches",
    )
    parser.add_argument(
        "--in-flow-process",
        action="store_true",
        help="train in the flow's process (BATON_TRAINING_PROCESS=flow), for comparison",
    )
    parser.add_argument(
        "--async-save",
        action="store_true",
        help="the flow saves in the background (checkpoint.async_save): training waits for "
        "a snapshot only",
    )
    parser.add_argument("--plain-loop", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_flow_process:
        os.environ["BATON_TRAINING_PROCESS"] = "flow"  # the operator's switch
    if args.plain_loop is not None:  # the baseline's own process (plain_script)
        total, epochs = plain_loop(
            args.plain_loop, args.samples, args.epochs, args.hidden, args.interval_iters
        )
        print(json.dumps([total, epochs]))
        return

    from baton.flows.server import EmbeddedServer, prefect_api
    from baton.flows.train import train_pipeline

    root = Path(tempfile.mkdtemp(prefix="baton-overhead-"))
    if args.api_url:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        server = temporary_settings({PREFECT_API_URL: args.api_url})
    else:
        # The server `baton run` uses: launched by the run, heartbeats off.
        server = prefect_api(EmbeddedServer())
    with server:
        train_pipeline(config=config(root / "warmup", "warmup", 256, 1))
        loop_times, call_times, span_times, server_cpu, anatomy = [], [], [], [], []
        loop_epochs, flow_epochs = [], []

        def run_flow(repeat: int) -> None:
            cpu = server_cpu_seconds()
            start = time.perf_counter()
            state = train_pipeline(
                config=config(
                    root / f"flow{repeat}",
                    "bench",
                    args.samples,
                    args.epochs,
                    args.hidden,
                    args.interval_iters,
                    args.async_save,
                ),
                return_state=True,
            )
            call_times.append(time.perf_counter() - start)
            server_cpu.append(server_cpu_seconds() - cpu)
            span, anatomy[:], epochs = asyncio.run(task_span(state.state_details.flow_run_id))
            span_times.append(span)
            flow_epochs.append(epochs)

        def plain(repeat: int) -> None:
            total, epochs = plain_script(root / f"loop{repeat}", args)
            loop_times.append(total)
            loop_epochs.append(epochs)

        for repeat in range(args.repeats):
            # Alternate the order, so that a drift of the machine's speed cancels out.
            if repeat % 2 == 0:
                plain(repeat)
                run_flow(repeat)
            else:
                run_flow(repeat)
                plain(repeat)
        micro = micro_costs(root / "micro")
    shutil.rmtree(root, ignore_errors=True)

    def median(values):
        return sorted(values)[len(values) // 2]

    def spread(values):
        return (max(values) - min(values)) / median(values)

    loop, call, span = min(loop_times), min(call_times), min(span_times)
    pair_ratios = [s / lp for s, lp in zip(span_times, loop_times, strict=True)]
    epoch_length = -(-args.samples // 64)
    # Per epoch: each run's median epoch; the first epoch of each is left out on both sides
    # (the flow's includes nothing more, but both warm their caches then).
    loop_epoch = [median(e[1:] or e) for e in loop_epochs]
    flow_epoch = [median(e[1:] or e) for e in flow_epochs]
    print(
        f"{args.epochs} epochs x {epoch_length} iterations, MLP 64-{args.hidden}-{args.hidden}-10, "
        f"{args.repeats} repeats in alternating order, {torch.get_num_threads()} torch threads"
        + (f", a checkpoint every {args.interval_iters} iterations" if args.interval_iters else "")
    )
    print(f"  server: {args.api_url or 'embedded (as baton run launches it)'}")
    if args.async_save:
        print("  flow's saves: in the background (checkpoint.async_save)")
    print(
        "  training: "
        + (
            "in the flow's process"
            if args.in_flow_process
            else "in a process forked from the flow's"
        )
    )
    print("  per epoch (flow: train-epoch + save-checkpoint tasks and the gaps before them;")
    print("  plain script: the epoch's loop and torch.save), each run's median epoch:")
    print(f"    plain script {[round(t, 3) for t in loop_epoch]}")
    print(f"    flow         {[round(t, 3) for t in flow_epoch]}")
    print(
        f"    ratio of medians (flow / plain): {median(flow_epoch) / median(loop_epoch):.3f} "
        "(target <= 1.02)"
    )
    # Each flow against the plain run next to it: a drift of the machine's speed between
    # repeats cancels out of a pair.
    epoch_pairs = [f / lp for f, lp in zip(flow_epoch, loop_epoch, strict=True)]
    print(
        f"    paired ratios: {[round(r, 3) for r in epoch_pairs]}, median {median(epoch_pairs):.3f}"
    )
    print(
        f"    noise: the plain script's epochs spread over {100 * spread(loop_epoch):.1f} % of "
        "their median across its runs; a ratio closer to 1 than that is not a difference "
        "this machine can show"
    )
    print("  whole run (flow: first task to the flow run's end; plain: its loop and saves):")
    print(
        f"    plain runs {[round(t, 2) for t in loop_times]}, flow spans {[round(t, 2) for t in span_times]}"
    )
    print(
        f"    paired ratios: {[round(r, 3) for r in pair_ratios]}, median {median(pair_ratios):.3f}"
    )
    print(f"    ratio of medians: {median(span_times) / median(loop_times):.3f}")
    print(f"    noise: the plain runs spread over {100 * spread(loop_times):.1f} % of their median")
    print(
        f"    plain, best {loop:7.2f} s; flow span, best {span:7.2f} s (ratio of bests {span / loop:.3f})"
    )
    print(f"    flow whole call, best {call:7.2f} s (ratio of bests {call / loop:.3f})")
    print(
        f"    fixed cost per epoch {1000 * (median(span_times) - median(loop_times)) / args.epochs:7.1f} ms"
        " (median span - median plain run, per epoch)"
    )
    if args.api_url:
        print("  server CPU during a flow: not measured (an external server)")
    else:
        print(
            f"  embedded server CPU during a flow: {median(server_cpu):.2f} s "
            f"({1000 * median(server_cpu) / args.epochs:.0f} ms per epoch)"
        )
    for name, value in micro.items():
        print(f"    {name:28} {value:7.1f} ms")
    print("  the last flow run, task by task:")
    print("\n".join(anatomy))


if __name__ == "__main__":
    main()
