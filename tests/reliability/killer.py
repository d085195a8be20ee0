"""Kill training runs at random points, restart them, and check nothing is lost.

Each trial trains a small pipeline (iteration checkpoints, validation, rotation with
keep-last and keep-best) in child processes. A seeded random choice picks up to three
kills per trial, each at a random occurrence of a random point (an iteration, inside
validation, inside a checkpoint write, during a manifest update, during rotation, or at
a random moment from outside). After every kill, every committed checkpoint must
verify; the run is restarted until it finishes, and its final checkpoint must be
bitwise equal to an uninterrupted run's.

    .venv/bin/python -m tests.reliability.killer --trials 50 [--seed 0]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from baton import CheckpointStore
from baton.config import load_config

ROOT = Path(__file__).resolve().parents[2]
POINTS = ("iteration", "validation", "checkpoint-write", "manifest-update", "rotation", "time")
# Rough number of occurrences of each point in one run of the pipeline below.
OCCURRENCES = {
    "iteration": 32,
    "validation": 16,
    "checkpoint-write": 60,
    "manifest-update": 14,
    "rotation": 6,
}


def pipeline_config(work_dir: Path) -> dict:
    return load_config(
        {
            "experiment_name": "victim",
            "work_dir": str(work_dir),
            "randomness": {"seed": 5, "deterministic": True},
            "model": {
                "type": "MLP",
                "in_features": 8,
                "num_classes": 3,
                "hidden": [32],
                "dropout": 0.2,
            },
            "train_data": {"dataset": {"type": "SyntheticClassification"}, "batch_size": 32},
            "val_data": {
                "dataset": {"type": "SyntheticClassification", "seed": 1},
                "batch_size": 32,
                "shuffle": False,
            },
            "optim_wrapper": {"optimizer": {"type": "AdamW", "lr": 0.01}, "accumulative_counts": 3},
            "param_scheduler": [
                {"type": "LinearLR", "start_factor": 0.1, "by_epoch": False, "end": 6},
                {"type": "CosineAnnealingLR", "convert_to_iter_based": True},
            ],
            "train": {"max_epochs": 4},
            "checkpoint": {
                "interval_iters": 3,
                "keep_last": 2,
                "keep_best": 1,
                "best_metric": "val/accuracy",
            },
        }
    ).model_dump(mode="json")


def run_child(config: dict, point: str, n: int, delay: float | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.child", json.dumps(config), point, str(n)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if delay is not None:
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=300)
    if process.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(
            f"child failed ({process.returncode}): {err.decode(errors='replace')[-2000:]}"
        )
    return process.returncode


def final_state(config: dict) -> dict:
    store = CheckpointStore(Path(config["work_dir"]) / config["experiment_name"])
    return torch.load(store.latest().uri, weights_only=True)


def same(a: dict, b: dict) -> bool:
    weights = all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    moments = all(
        torch.equal(value, b["optimizer"]["state"][pid][name])
        for pid, state in a["optimizer"]["state"].items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    )
    return weights and moments and a["meta"]["iter"] == b["meta"]["iter"]


@dataclass
class TrialResult:
    seed: int
    kills: list[str] = field(default_factory=list)
    corrupt_committed: int = 0
    bitwise_equal: bool = False


def trial(seed: int, reference: dict, root: Path, points=POINTS) -> TrialResult:
    rng = random.Random(seed)
    config = pipeline_config(root / f"trial{seed}")
    store = CheckpointStore(Path(config["work_dir"]) / config["experiment_name"])
    result = TrialResult(seed)
    planned = [rng.choice(points) for _ in range(rng.randint(1, 3))]
    for attempt in range(len(planned) + 3):
        if attempt < len(planned):
            point = planned[attempt]
            if point == "time":
                code = run_child(config, "none", 0, delay=rng.uniform(1.5, 4.0))
            else:
                code = run_child(config, point, rng.randint(1, OCCURRENCES[point]))
        else:
            code = run_child(config, "none", 0)
        if code != 0:
            result.kills.append(planned[attempt])
            for ref in store.list():
                if not store.is_valid(ref):
                    result.corrupt_committed += 1
        elif attempt >= len(planned) or store.latest() is not None:
            break
    result.bitwise_equal = same(reference, final_state(config))
    return result


def reference_state(root: Path) -> dict:
    config = pipeline_config(root / "reference")
    assert run_child(config, "none", 0) == 0
    return final_state(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="baton-kill-"))
    start = time.time()
    reference = reference_state(root)
    results = [trial(args.seed + i, reference, root) for i in range(args.trials)]
    kills = [k for r in results for k in r.kills]
    print(f"{len(results)} trials, {len(kills)} kills in {time.time() - start:.0f} s")
    for point in POINTS:
        print(f"  killed at {point:17} {kills.count(point):4d}")
    print(
        f"  runs bitwise equal to the uninterrupted run: {sum(r.bitwise_equal for r in results)}/{len(results)}"
    )
    print(
        f"  corrupt committed checkpoints seen after kills: {sum(r.corrupt_committed for r in results)}"
    )
    failed = [r for r in results if not r.bitwise_equal or r.corrupt_committed]
    if failed:
        print("FAILED trials:", [(r.seed, r.kills) for r in failed])
        raise SystemExit(1)


if __name__ == "__main__":
    main()
