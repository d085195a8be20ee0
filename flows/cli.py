"""The ``baton`` command: run, validate, inspect checkpoints, evaluate.

Exit codes: 0 success, 1 failure, 2 bad config or bad arguments.
"""

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The engine (and torch with it) is imported inside the commands: `baton run` starts
# Prefect's server first, so that it boots while torch loads.


def _settings(args) -> dict:
    from baton.config import parse_overrides

    settings = parse_overrides(args.set or [])
    for key in ("experiment_name", "resume", "work_dir"):
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def _metrics_table(history: list[dict]) -> str:
    if not history:
        return "(no epochs recorded)"
    keys = [k for k in history[-1] if k not in ("time", "kind", "epoch", "iter")]
    header = ["epoch", *keys]
    rows = [[str(r["epoch"])] + [f"{r.get(k, float('nan')):.4f}" for k in keys] for r in history]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def cmd_validate(args) -> int:
    from baton.config import load_config

    cfg = load_config(args.config, _settings(args))
    print(
        f"{args.config}: valid (experiment {cfg.experiment_name}, config hash {cfg.config_hash[:12]})"
    )
    return 0


@contextlib.contextmanager
def _prefect_session(load: Callable[[], Any]) -> Iterator[Any]:
    """Boot Prefect's embedded server (unless an API URL is configured) while ``load``
    runs (config validation and imports: torch, the engine, the flow), then point Prefect
    at it; yields what ``load`` returned. The server stops when the session ends, once it
    has recorded everything the run sent it (or after a bounded wait that is reported),
    and at once if ``load`` fails (a bad config)."""
    _prefect_env()
    from flows.server import EmbeddedServer, configured_api_url, prefect_api

    # Launched before anything is imported; dropped again if the profile names a server.
    server = None if os.environ.get("PREFECT_API_URL") else EmbeddedServer()
    try:
        if server is not None and configured_api_url():
            server.stop()
            server = None
        loaded = load()
    except BaseException:
        if server is not None:
            server.stop()
        raise
    with prefect_api(server):
        yield loaded


def cmd_run(args) -> int:
    if sys.stderr.isatty():
        os.environ.setdefault("BATON_PROGRESS", "1")

    def load():
        from baton import pipeline
        from baton.config import load_config

        cfg = load_config(args.config, _settings(args))  # exit 2 before any run starts
        # What the run will import anyway, loaded while the server boots.
        import flows.train  # noqa: F401

        pipeline.preload()
        return cfg

    with _prefect_session(load) as cfg:
        from flows.train import train_pipeline
        from tasks.report import read_history

        state = train_pipeline(
            config=args.config,
            overrides=args.set or None,
            experiment_name=args.experiment_name,
            resume=args.resume,
            work_dir=args.work_dir,
            return_state=True,
        )
        if not state.is_completed():
            print(f"baton: the run ended {state.name}: {state.message}", file=sys.stderr)
            return 1
        result = state.result()
        print()
        print(_metrics_table(read_history(cfg.model_dump(mode="json"))))
        checkpoint = result.checkpoint.uri if result.checkpoint else "none"
        print(
            f"\n{cfg.experiment_name}: epoch {result.epoch}/{result.max_epochs}, "
            f"checkpoint {checkpoint}",
            flush=True,
        )
    return 0


def cmd_ckpt_list(args) -> int:
    from baton import CheckpointStore

    store = CheckpointStore(args.experiment_dir)
    if not store.manifest_path.exists():
        print(
            f"{args.experiment_dir}: no manifest.json (no committed checkpoints)", file=sys.stderr
        )
        return 1
    refs = store.list()
    latest = store.latest()
    for ref in refs:
        status = "ok" if store.is_valid(ref) else "INVALID"
        mark = " <- latest" if latest == ref else ""
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in ref.metrics.items())
        print(
            f"{status:7} epoch {ref.epoch:4d} iter {ref.iter:7d} {ref.sha256[:12]} {ref.uri}{mark} {metrics}"
        )
    return 0


def cmd_ckpt_inspect(args) -> int:
    from baton.checkpoint import io

    size, digest = io.sha256_of(args.checkpoint)
    checkpoint = io.load(args.checkpoint)
    meta = dict(checkpoint.get("meta") or {}) if isinstance(checkpoint, dict) else {}
    meta.pop("rng", None)
    meta.pop("config", None)
    summary = {
        "file": args.checkpoint,
        "size": size,
        "sha256": digest,
        "sections": sorted(checkpoint)
        if isinstance(checkpoint, dict)
        else type(checkpoint).__name__,
        "meta": meta,
    }
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_evaluate(args) -> int:
    def load():
        from baton import pipeline
        from baton.config import load_config, parse_overrides

        load_config(args.config, parse_overrides(args.set or []))
        import flows.evaluate  # noqa: F401

        pipeline.preload()

    with _prefect_session(load):
        from flows.evaluate import evaluate_checkpoint

        metrics = evaluate_checkpoint(
            checkpoint=args.checkpoint, config=args.config, overrides=args.set or None
        )
    for key, value in sorted(metrics.items()):
        print(f"{key:16} {value:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton", description="Restartable PyTorch training pipelines on Prefect"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def config_args(p, overrides=True):
        p.add_argument("config", help="pipeline config (YAML)")
        if overrides:
            p.add_argument(
                "--set", action="append", metavar="KEY=VALUE", help="override a config value"
            )

    run = commands.add_parser("run", help="train a pipeline (resumes automatically)")
    config_args(run)
    run.add_argument("--experiment-name")
    run.add_argument("--resume", help="auto, never, or a checkpoint path")
    run.add_argument("--work-dir")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("validate", help="check a config; writes nothing")
    config_args(check)
    check.set_defaults(func=cmd_validate)

    ckpt = commands.add_parser("ckpt", help="list or inspect checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True)
    listing = ckpt_commands.add_parser(
        "list", help="an experiment's checkpoints and their validity"
    )
    listing.add_argument("experiment_dir", type=Path)
    listing.set_defaults(func=cmd_ckpt_list)
    inspect_ = ckpt_commands.add_parser("inspect", help="what a checkpoint file holds")
    inspect_.add_argument("checkpoint")
    inspect_.set_defaults(func=cmd_ckpt_inspect)

    evaluate = commands.add_parser("evaluate", help="validation metrics of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--config", required=True)
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE")
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``baton`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        from baton.errors import BatonError, ConfigError

        if not isinstance(err, BatonError):
            raise
        print(f"baton: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
