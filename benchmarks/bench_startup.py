"""Start-up: from ``baton run`` to the first training step, cold and warm.

Each measurement is a new process, as a user's command is. The baseline, measured in
the same run, is a plain script that imports torch, builds the same model and data and
takes one step. "Cold" is a fresh ``PREFECT_HOME`` (Prefect migrates its database);
"warm" reuses it. The first step is read from ``metrics.jsonl`` (a record after every
iteration here). Phases come from the run's own log lines.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 3] [--checkout DIR]

``--checkout`` runs another checkout's ``baton.flows.cli`` (e.g. an older commit in a git
worktree) with this interpreter, to compare before and after.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLAIN = """
import time, torch
from torch import nn
from baton.data import DigitsDataset
from baton.models import MLP
torch.manual_seed(0)
data = DigitsDataset("train")
model = MLP(64, 10, hidden=[128, 64])
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
inputs, targets = data.tensors
nn.functional.cross_entropy(model(inputs[:32]), targets[:32]).backward()
optimizer.step()
print(time.time())
"""

_LOG_TIME = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+ +\| (.*)$")


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=str(ROOT),
    )
    return env


def _log_times(output: str, day: datetime) -> dict[str, float]:
    """Epoch times of the run's milestones, from its log lines."""
    marks = {
        "server": "Starting temporary server",
        "flow": "Beginning flow run",
        "prepared": "prepared ",
    }
    found = {}
    for line in output.splitlines():
        match = _LOG_TIME.match(line)
        if not match:
            continue
        stamp = datetime.strptime(f"{day:%Y-%m-%d} {match[1]}", "%Y-%m-%d %H:%M:%S.%f")
        for key, text in marks.items():
            if key not in found and text in match[2]:
                found[key] = stamp.timestamp()
    return found


def run_baton(checkout: Path, home: Path, work_dir: Path) -> dict[str, float]:
    start = time.time()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "baton.flows.cli",
            "run",
            str(ROOT / "configs" / "digits_mlp.yaml"),
            "--work-dir",
            str(work_dir),
            "--set",
            "train.max_epochs=1",
            "--set",
            "train.log_interval=1",
        ],
        cwd=checkout,
        env={**_env(home), "PYTHONPATH": str(checkout)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    end = time.time()
    if result.returncode != 0:
        raise SystemExit(f"baton run failed:\n{result.stdout}\n{result.stderr}")
    records = (work_dir / "digits-mlp" / "metrics.jsonl").read_text().splitlines()
    first_step = next(json.loads(r)["time"] for r in records if '"iteration"' in r)
    phases = _log_times(result.stdout + result.stderr, datetime.fromtimestamp(start))
    return {
        "first step": first_step - start,
        "total": end - start,
        **{name: t - start for name, t in phases.items()},
    }


def run_plain(home: Path) -> float:
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-c", PLAIN],
        cwd=ROOT,
        env=_env(home),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(out.stdout.strip().splitlines()[-1]) - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkout", type=Path, default=ROOT)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="baton-startup-"))
    try:
        cold, warm, plain = [], [], []
        for repeat in range(args.repeats):
            home = root / f"home{repeat}"
            plain.append(run_plain(home))
            cold.append(run_baton(args.checkout, home, root / f"cold{repeat}"))
            warm.append(run_baton(args.checkout, home, root / f"warm{repeat}"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def median(values):
        values = sorted(values)
        return values[len(values) // 2]

    base = median(plain)
    print(f"checkout {args.checkout}, {args.repeats} repeats, medians (seconds from process start)")
    print(f"  plain script to its first step   {base:6.2f} s   1.00")
    for name, runs in (("cold", cold), ("warm", warm)):
        step = median([r["first step"] for r in runs])
        total = median([r["total"] for r in runs])
        print(
            f"  baton run, {name:4} to first step  {step:6.2f} s   {step / base:.2f}"
            f"   (whole command {total:.2f} s)"
        )
        for phase in ("server", "flow", "prepared"):
            values = [r[phase] for r in runs if phase in r]
            if values:
                print(f"      {phase:9} at {median(values):6.2f} s")


if __name__ == "__main__":
    main()
