"""How the costs grow: overhead against epoch length and against iterations per epoch
with iteration checkpoints, write speed against checkpoint size.

Runs ``bench_overhead`` and ``bench_checkpoint_write`` at several sizes (each in a fresh
process, so one does not warm the other), prints tables, and draws
``docs/overhead_scale.png``.

    .venv/bin/python benchmarks/bench_scale.py [--quick] [--plot-only]
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# One torch thread: on this 2-core machine that leaves a core for the rest, as on a GPU
# host whose CPU does not train, and halves the run-to-run noise of two threads.
THREADS = ["--threads", "1"]
# samples per epoch -> about 0.15 s, 0.8 s, 2 s and 6 s epochs here (64 per batch)
EPOCH_SAMPLES = [5_000, 25_000, 60_000, 180_000]
CHECKPOINT_MB = [10, 100, 1024, 2048]
# iterations per epoch, with an iteration checkpoint every ITER_CHECKPOINT_EVERY of them
# (a small MLP, so that 10,000 iterations stay a few seconds)
EPOCH_ITERATIONS = [100, 1_000, 10_000]
ITER_CHECKPOINT_EVERY = 100


def run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def _paired_median(text: str) -> float:
    return float(re.search(r"paired ratios .*median ([\d.]+)", text).group(1))


def overhead(samples: int, repeats: int) -> tuple[float, float]:
    text = run(
        "bench_overhead.py",
        "--samples",
        str(samples),
        "--epochs",
        "5",
        "--repeats",
        str(repeats),
        *THREADS,
    )
    loop = float(re.search(r"plain loop, best\s+([\d.]+) s", text).group(1))
    return loop / 5, _paired_median(text)


def iteration_overhead(iterations: int, repeats: int) -> tuple[float, float]:
    text = run(
        "bench_overhead.py",
        "--samples",
        str(iterations * 64),
        "--epochs",
        "2",
        "--hidden",
        "64",
        "--interval-iters",
        str(ITER_CHECKPOINT_EVERY),
        "--repeats",
        str(repeats),
        *THREADS,
    )
    loop = float(re.search(r"plain loop, best\s+([\d.]+) s", text).group(1))
    return loop / 2, _paired_median(text)


def write_speed(size_mb: int) -> tuple[float, float]:
    text = run("bench_checkpoint_write.py", "--size-mb", str(size_mb), "--repeats", "3")
    vs_torch = float(re.search(r"baton / torch.save time:\s+([\d.]+)", text).group(1))
    vs_raw = float(re.search(r"baton / raw disk throughput:\s+([\d.]+)", text).group(1))
    return vs_torch, vs_raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes, one repeat")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw from docs/overhead_scale.json"
    )
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((ROOT / "docs" / "overhead_scale.json").read_text()))
        return
    samples = EPOCH_SAMPLES[:2] if args.quick else EPOCH_SAMPLES
    sizes = CHECKPOINT_MB[:2] if args.quick else CHECKPOINT_MB
    repeats = 1 if args.quick else 2

    rows = [(n, *overhead(n, repeats)) for n in samples]
    print("epoch length   flow/loop (median of paired runs)")
    for n, epoch_s, ratio in rows:
        print(f"  {epoch_s:6.2f} s      {ratio:.3f}   ({-(-n // 64)} iterations)")
    iteration_counts = EPOCH_ITERATIONS[:2] if args.quick else EPOCH_ITERATIONS
    iteration_rows = [(n, *iteration_overhead(n, repeats)) for n in iteration_counts]
    print(f"iterations per epoch, a checkpoint every {ITER_CHECKPOINT_EVERY}: flow/loop")
    for n, epoch_s, ratio in iteration_rows:
        saves = max(0, -(-n // ITER_CHECKPOINT_EVERY) - 1) + 1
        print(f"  {n:6d} ({epoch_s:5.2f} s, {saves} saves per epoch)   {ratio:.3f}")
    writes = [(mb, *write_speed(mb)) for mb in sizes]
    print("checkpoint     baton/torch.save time   baton/raw disk throughput")
    for mb, vs_torch, vs_raw in writes:
        print(f"  {mb:6d} MiB   {vs_torch:.3f}                   {vs_raw:.3f}")

    results = {"overhead": rows, "iterations": iteration_rows, "writes": writes}
    (ROOT / "docs" / "overhead_scale.json").write_text(json.dumps(results, indent=1))
    plot(results)


def plot(results: dict) -> None:
    """Draw docs/overhead_scale.png from the measured rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, writes = results["overhead"], results["writes"]
    iteration_rows = results.get("iterations", [])
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    left.plot([r[1] for r in rows], [r[2] for r in rows], "o-", label="flow / plain loop")
    left.axhline(1.05, color="grey", linestyle="--", label="target 1.05")
    left.set_xscale("log")
    left.set_xticks([r[1] for r in rows], [f"{r[1]:.2g}" for r in rows])
    left.minorticks_off()
    left.set_xlabel("epoch length (s)")
    left.set_ylabel("time ratio")
    left.set_title("orchestration overhead (5 epochs)")
    left.legend()
    if iteration_rows:
        middle.plot(
            [r[0] for r in iteration_rows],
            [r[2] for r in iteration_rows],
            "o-",
            label=f"flow / plain loop, a checkpoint every {ITER_CHECKPOINT_EVERY} iterations",
        )
        middle.axhline(1.0, color="grey", linestyle=":")
        middle.set_xscale("log")
        middle.set_xticks([r[0] for r in iteration_rows], [str(r[0]) for r in iteration_rows])
        middle.minorticks_off()
        middle.legend(fontsize="small")
    middle.set_xlabel("iterations per epoch")
    middle.set_ylabel("time ratio")
    middle.set_title("iteration checkpoints (2 epochs)")
    right.plot(
        [w[0] for w in writes], [w[1] for w in writes], "o-", label="baton / torch.save (time)"
    )
    right.plot(
        [w[0] for w in writes], [w[2] for w in writes], "s-", label="baton / raw disk (throughput)"
    )
    right.set_xscale("log")
    right.set_xticks([w[0] for w in writes], [str(w[0]) for w in writes])
    right.minorticks_off()
    right.set_xlabel("checkpoint size (MiB)")
    right.set_title("checkpoint writes")
    right.legend()
    fig.tight_layout()
    target = ROOT / "docs" / "overhead_scale.png"
    fig.savefig(target, dpi=100)
    print(f"plot: {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
