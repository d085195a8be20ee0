"""Peak memory of a flow run against the plain loop, each in a fresh process.

Four processes report their peak RSS: the plain loop (PyTorch alone), Prefect's own
footprint (imports plus one empty flow on the embedded server), the plain loop in a
process that has also run that empty flow (the libraries' combined footprint), and the
training flow. The flow's cost for restartability is its peak minus the third; it must
stay under one copy of the model state (weights plus optimizer state).

    .venv/bin/python benchmarks/bench_memory.py [--hidden 4096]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = """
import json, os, resource, sys, tempfile
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
sys.path.insert(0, "benchmarks")
from bench_overhead import config, plain_loop
hidden, samples, epochs = {hidden}, 20000, 2
"""

PLAIN = """
from pathlib import Path
plain_loop(Path(tempfile.mkdtemp()), samples, epochs, hidden=hidden)
"""

PREFECT_ONLY = """
from prefect import flow
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
import baton.flows.train
@flow
def empty():
    return 1
with temporary_settings({{PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}}):
    empty()
"""

FLOW = """
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from baton.flows.train import train_pipeline
with temporary_settings({{PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}}):
    train_pipeline(config=config(tempfile.mkdtemp(), "mem", samples, epochs, hidden=hidden))
"""

REPORT = """
print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak(body: str, hidden: int, env: dict) -> float:
    code = COMMON.format(hidden=hidden) + body.format() + REPORT
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return float(
        next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK_MB"))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    args = parser.parse_args()
    env = {
        **os.environ,
        "PREFECT_HOME": tempfile.mkdtemp(prefix="baton-mem-home-"),
        "PYTHONPATH": str(ROOT),
    }
    params = 64 * args.hidden + args.hidden * args.hidden + args.hidden * 10
    state_mb = 2 * 4 * params / (1 << 20)  # weights + SGD momentum, float32
    plain = peak(PLAIN, args.hidden, env)
    prefect_only = peak(PREFECT_ONLY, args.hidden, env)
    both = peak(PREFECT_ONLY + PLAIN, args.hidden, env)
    flow = peak(FLOW, args.hidden, env)
    extra = flow - both
    print(f"model state (weights + momentum)    {state_mb:7.0f} MiB")
    print(f"peak RSS, plain loop                {plain:7.0f} MiB")
    print(f"peak RSS, Prefect + empty flow      {prefect_only:7.0f} MiB")
    print(f"peak RSS, plain loop after Prefect  {both:7.0f} MiB")
    print(f"peak RSS, training flow             {flow:7.0f} MiB")
    print(
        f"flow - (loop after Prefect)         {extra:7.0f} MiB  (target <= {state_mb:.0f} MiB, one copy of the state)"
    )


if __name__ == "__main__":
    main()
