"""How the costs grow: overhead against epoch length, write speed against checkpoint size.

Runs ``bench_overhead`` and ``bench_checkpoint_write`` at several sizes (each in a fresh
process, so one does not warm the other), prints a table, and draws
``docs/overhead_scale.png``.

    .venv/bin/python benchmarks/bench_scale.py [--quick]
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# samples per epoch -> about 0.1 s, 0.5 s, 2 s and 5 s epochs on this machine (64 per batch)
EPOCH_SAMPLES = [5_000, 25_000, 100_000, 250_000]
CHECKPOINT_MB = [10, 100, 1024, 2048]


def run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def overhead(samples: int, repeats: int) -> tuple[float, float]:
    text = run(
        "bench_overhead.py", "--samples", str(samples), "--epochs", "5", "--repeats", str(repeats)
    )
    loop = float(re.search(r"plain loop\s+([\d.]+) s", text).group(1))
    ratio = float(
        re.search(r"median of paired ratios \(flow span / loop\): ([\d.]+)", text).group(1)
    )
    return loop / 5, ratio


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
    writes = [(mb, *write_speed(mb)) for mb in sizes]
    print("checkpoint     baton/torch.save time   baton/raw disk throughput")
    for mb, vs_torch, vs_raw in writes:
        print(f"  {mb:6d} MiB   {vs_torch:.3f}                   {vs_raw:.3f}")

    results = {"overhead": rows, "writes": writes}
    (ROOT / "docs" / "overhead_scale.json").write_text(json.dumps(results, indent=1))
    plot(results)


def plot(results: dict) -> None:
    """Draw docs/overhead_scale.png from the measured rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, writes = results["overhead"], results["writes"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r[1] for r in rows], [r[2] for r in rows], "o-", label="flow / plain loop")
    left.axhline(1.05, color="grey", linestyle="--", label="target 1.05")
    left.set_xscale("log")
    left.set_xticks([r[1] for r in rows], [f"{r[1]:.2g}" for r in rows])
    left.minorticks_off()
    left.set_xlabel("epoch length (s)")
    left.set_ylabel("time ratio")
    left.set_title("orchestration overhead (5 epochs)")
    left.legend()
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
