"""The ``baton`` command: run, validate, inspect and compare checkpoints, verify, evaluate,
report.

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
    from baton.config import RUN_SETTINGS, run_settings

    return run_settings(args.set, **{key: getattr(args, key, None) for key in RUN_SETTINGS})


def _trust_operator_flags(args) -> None:
    """The command line is the operator's: what it names explicitly is trusted, in this
    process only (the flow reads trust from the environment, see ``baton.trust``).

    ``--allow-module``/``--allow-scheme`` widen modules and schemes; the config file,
    ``--work-dir`` and ``--resume`` named here are allowed where they are. Overrides
    (``--set``) are data like a config's contents and widen nothing.
    """
    additions: dict[str, list[str]] = {
        "BATON_ALLOWED_MODULES": list(getattr(args, "allow_module", None) or []),
        "BATON_ALLOWED_SCHEMES": list(getattr(args, "allow_scheme", None) or []),
        "BATON_CONFIG_ROOTS": [],
        "BATON_CHECKPOINT_ROOTS": [],
        "BATON_WORK_DIR_ROOTS": [],
    }
    config = getattr(args, "config", None)
    if config and Path(config).suffix in (".yaml", ".yml"):
        additions["BATON_CONFIG_ROOTS"].append(str(Path(config).resolve().parent))
    work_dir = getattr(args, "work_dir", None)
    if work_dir and not work_dir.startswith("~"):
        additions["BATON_WORK_DIR_ROOTS"].append(str(Path(work_dir).resolve()))
    for checkpoint in (getattr(args, "resume", None), getattr(args, "checkpoint", None)):
        if checkpoint and checkpoint not in ("auto", "never") and "://" not in checkpoint:
            additions["BATON_CHECKPOINT_ROOTS"].append(str(Path(checkpoint).resolve().parent))
    for name, values in additions.items():
        separator = (
            "," if name in ("BATON_ALLOWED_MODULES", "BATON_ALLOWED_SCHEMES") else os.pathsep
        )
        current = [v for v in os.environ.get(name, "").split(separator) if v]
        if values:
            os.environ[name] = separator.join([*current, *values])


def _prefect_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def cmd_validate(args) -> int:
    from baton.config import load_config

    _trust_operator_flags(args)
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
    from baton.flows.server import EmbeddedServer, configured_api_url, prefect_api

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
    _trust_operator_flags(args)

    def load():
        from baton.config import load_config
        from baton.run import pipeline

        cfg = load_config(args.config, _settings(args))  # exit 2 before any run starts
        # What the run will import anyway, loaded while the server boots.
        import baton.flows.train  # noqa: F401
        from baton.run.own_process import training_process_setting

        training_process_setting()  # the operator's, refused before any run starts too

        pipeline.preload()
        return cfg

    with _prefect_session(load) as cfg:
        from baton.experiment import Experiment
        from baton.experiment.metrics import history_table
        from baton.flows.train import train_pipeline

        state = train_pipeline(
            config=args.config,
            overrides=args.set or None,
            experiment_name=args.experiment_name,
            resume=args.resume,
            work_dir=args.work_dir,
            fork=args.fork,
            nproc=args.nproc,
            return_state=True,
        )
        if not state.is_completed():
            print(f"baton: the run ended {state.name}: {state.message}", file=sys.stderr)
            return 1
        result = state.result()
        print()
        print(history_table(Experiment.of(cfg).metrics.epochs()))
        checkpoint = result.checkpoint.uri if result.checkpoint else "none"
        print(
            f"\n{cfg.experiment_name}: epoch {result.epoch}/{result.max_epochs}, "
            f"checkpoint {checkpoint}",
            flush=True,
        )
    return 0


def cmd_ckpt_list(args) -> int:
    """List an experiment's checkpoints by lineage, each verified, all from one committed
    state of the manifest. Read-only: a manifest to repair or migrate is shown as the next
    run holding the experiment's lock will write it."""
    from baton import CheckpointStore

    store = CheckpointStore(args.experiment_dir)
    if not store.manifest_path.exists() and not store.journal_path.exists():
        print(
            f"{args.experiment_dir}: no manifest.json (no committed checkpoints)", file=sys.stderr
        )
        return 1
    report = store.check()
    if report.problem:
        print(
            f"baton: {report.problem}; listed from the checkpoint files instead (the next "
            "run of the experiment rebuilds the manifest)",
            file=sys.stderr,
        )
    elif report.pending == "migrate":
        print(
            "baton: the manifest has the first format (absolute paths); listed as the next "
            "run will migrate it (nothing was written)",
            file=sys.stderr,
        )
    for entry in report.entries:
        ref = entry.ref
        status = "ok" if entry.problem is None else "INVALID"
        latest = report.latest
        mark = (
            " <- latest" if latest and (ref.uri, ref.sha256) == (latest.uri, latest.sha256) else ""
        )
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in ref.metrics.items())
        why = f" ({entry.problem})" if entry.problem else ""
        print(
            f"{status:7} L{entry.lineage:<3} epoch {ref.epoch:4d} iter {ref.iter:7d} "
            f"{ref.sha256[:12]} {ref.uri}{mark} {metrics}{why}".rstrip()
        )
    for what, why in report.outside:
        print(f"OUTSIDE {what}: {why}; reported, never read or deleted")
    for lineage in report.lineages:
        print(_lineage_line(lineage, newest=lineage is report.lineages[-1]))
    return 0


def cmd_report(args) -> int:
    """Print an experiment's per-epoch history and write its curves (loss, accuracy,
    learning rate per epoch) to a PNG: the plot of the run summary. Reads only the
    experiment; writes only the PNG."""
    from baton.experiment.metrics import history_table
    from baton.tracking.curves import write_plot

    experiment = _experiment_at(Path(args.experiment_dir))
    history = experiment.metrics.epochs()
    print(history_table(history))
    if not history:
        print(
            f"baton: {experiment.root} has no epochs recorded yet: nothing to plot", file=sys.stderr
        )
        return 1
    output = Path(args.output or f"{experiment.name}-curves.png")
    if output.is_dir():
        print(
            f"baton: {output} is a folder; name the PNG file to write (--output curves.png)",
            file=sys.stderr,
        )
        return 2
    written = write_plot(history, output)
    if written is None:
        print(
            "baton: no plot (matplotlib is not installed: pip install 'baton[plots]')",
            file=sys.stderr,
        )
    else:
        print(f"\ncurves written to {written}")
    return 0


def _lineage_line(lineage, *, newest: bool) -> str:
    import time

    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(lineage.started))
    parts = [f"lineage L{lineage.id}: {lineage.reason or 'started'}"]
    if lineage.started:
        parts.append(f"started {started}")
    if lineage.parent is not None:
        parts.append(f"from {Path(lineage.parent.uri).name} (epoch {lineage.parent.epoch})")
    elif lineage.parent_outside:
        parts.append(f"from {lineage.parent_outside}")
    if lineage.run:
        parts.append(f"run {lineage.run}")
    count = len(lineage.checkpoints)
    parts.append(f"{count} checkpoint{'s' if count != 1 else ''}")
    line = ", ".join(parts)
    return line + " <- newest: auto-resume continues it (a config it fits)" if newest else line


def _not_a_checkpoint(path: Path) -> str | None:
    """What a local file is when it cannot be a checkpoint; ``None`` when it may be one."""
    import stat

    from baton.checkpoint import sharded
    from baton.checkpoint.store import CheckpointStore

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing: no such file"
    except OSError as err:
        return f"unreadable ({os.strerror(err.errno) if err.errno else err})"
    if stat.S_ISDIR(mode):
        if CheckpointStore(path).manifest_path.exists():
            return f"an experiment folder; list its checkpoints with `baton ckpt list {path}`"
        if path.name.endswith(sharded.SUFFIX) and not path.is_symlink():
            return None  # a sharded checkpoint: loading it checks what it holds
        return (
            "a directory, not a checkpoint file (a sharded checkpoint is a folder named "
            f"*{sharded.SUFFIX})"
        )
    if not stat.S_ISREG(mode):
        return "a device or special file, not a checkpoint file"
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None  # torch's zip format, or a legacy pickle: load it to tell
    if not head:
        return "an empty file, not a checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary data, not a checkpoint (it starts with bytes {head[:8].hex(' ')})"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file, not a checkpoint (it starts with {first!r})"


def cmd_ckpt_inspect(args) -> int:
    """What a checkpoint holds (loaded safely): a file, or a sharded checkpoint's folder
    (then also its files and the world size that wrote it); one line and exit 1 for
    anything that is not a checkpoint."""
    from baton.checkpoint import io, sharded

    shards = None
    if io.is_local(args.checkpoint):
        path = io.local_path(args.checkpoint)
        what = _not_a_checkpoint(path)
        if what is not None:
            print(f"baton: {args.checkpoint} is {what}", file=sys.stderr)
            return 1
        if sharded.is_sharded(path):
            shards = {name: (path / name).stat().st_size for name in sharded.files_of(path)}
    size, digest = io.sha256_of(args.checkpoint)
    checkpoint = io.load(args.checkpoint)
    meta = dict(checkpoint.get("meta") or {}) if isinstance(checkpoint, dict) else {}
    meta.pop("rng", None)
    meta.pop("config", None)
    environment = meta.pop("environment", None)
    summary = {
        "file": args.checkpoint,
        "size": size,
        "sha256": digest,
        "sharded": shards is not None,
    }
    if shards is not None:
        if "world_size" in meta:
            summary["world_size"] = meta["world_size"]
        summary["files"] = shards
    summary["sections"] = (
        sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    )
    summary["meta"] = meta
    summary["environment"] = (
        environment or "none recorded (written by mmengine, or by an older baton)"
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_ckpt_diff(args) -> int:
    """Which entries of two checkpoint files differ (tensors: how many elements, max
    absolute and relative difference; other values: both sides). Streams: the files are
    memory-mapped and compared a part at a time. Exit 0 identical, 1 different, 2 when a
    file cannot be compared."""
    from baton.checkpoint import io
    from baton.checkpoint.mapped import diff_files
    from baton.errors import CheckpointError

    for path in (args.a, args.b):
        what = _not_a_checkpoint(io.local_path(path)) if io.is_local(path) else None
        if what is not None:
            print(f"baton: {path} is {what}; name two checkpoint files", file=sys.stderr)
            return 2
    try:
        differences = diff_files(args.a, args.b, ignore=tuple(args.ignore or ()))
        tensors, values, shown = 0, 0, 0
        for difference in differences:
            is_tensor = difference.kind in ("values", "dtype", "shape")
            tensors += is_tensor
            values += not is_tensor
            if shown < args.limit:
                print(difference)
                shown += 1
    except CheckpointError as err:
        print(f"baton: {err}", file=sys.stderr)
        return 2
    if tensors + values > shown:
        print(f"... and {tensors + values - shown} more (--limit)")
    if not tensors + values:
        print(f"{args.a} and {args.b}: identical (every tensor bitwise equal, same metadata)")
        return 0
    print(f"{tensors} tensor(s) and {values} other value(s) differ")
    return 1


def _experiment_at(path: Path):
    """The experiment in the folder an operator named; it must hold one already."""
    from baton.errors import ConfigError
    from baton.experiment import Experiment

    path = path.expanduser().absolute()
    try:
        experiment = Experiment(path.parent, path.name)
    except ValueError as err:
        raise ConfigError(f"{path} is not an experiment folder: {err}") from err
    store = experiment.store
    if not (
        store.manifest_path.exists()
        or store.journal_path.exists()
        or experiment.record_path.exists()
    ):
        raise ConfigError(f"{path} holds no experiment (no manifest.json, no experiment.json)")
    return experiment


def _policy(args):
    """The retention policy the options name."""
    from baton import RetentionPolicy
    from baton.errors import ConfigError

    try:
        return RetentionPolicy(
            keep_last=None if args.keep_last == "all" else args.keep_last,
            keep_best=args.keep_best,
            best_metric=args.best_metric,
            best_mode=args.best_mode,
        ).normalised()
    except ValueError as err:
        raise ConfigError(f"baton ckpt {args.ckpt_command}: {err}") from err


def cmd_ckpt_prune(args) -> int:
    """Delete an experiment's committed checkpoints that a retention policy does not keep:
    the operator's command (a run can only rotate by the experiment's own retention)."""
    experiment = _experiment_at(args.experiment_dir)
    policy = _policy(args)
    lineage = None
    if args.lineage is not None:
        digits = args.lineage.removeprefix("L")
        if not digits.isdigit():
            from baton.errors import ConfigError

            raise ConfigError(f"--lineage {args.lineage!r}: name a lineage as L2 or 2")
        lineage = int(digits)
    if args.dry_run:  # reads only: no lock, no repair written
        dropped = experiment.store.prune(policy, lineage=lineage, dry_run=True)
    else:
        with experiment.lock():
            dropped = experiment.store.prune(policy, lineage=lineage)
    verb = "would delete" if args.dry_run else "deleted"
    for ref in dropped:
        print(f"{verb} {ref.uri} (epoch {ref.epoch}, iter {ref.iter})")
    recorded = experiment.recorded_retention()
    print(
        f"{experiment.name}: {len(dropped)} checkpoint{'s' if len(dropped) != 1 else ''} "
        f"{'would be deleted' if args.dry_run else 'deleted'} by {policy}; runs keep rotating by the experiment's retention, "
        f"{recorded or 'not recorded yet'} (change it with `baton ckpt retention`)"
    )
    return 0


def cmd_ckpt_retention(args) -> int:
    """Show an experiment's recorded retention, or set it (the operator's command)."""
    from baton.errors import RetentionConflictError

    experiment = _experiment_at(args.experiment_dir)
    if args.keep_last is None:
        recorded = experiment.recorded_retention()
        shown = recorded or "none recorded (the next run records its own)"
        print(f"{experiment.name}: retention {shown}")
        return 0
    policy = _policy(args)
    with experiment.lock():
        try:
            old = experiment.recorded_retention()
        except RetentionConflictError:
            old = "unreadable"  # the operator sets it again
        experiment.set_retention(policy)
    print(
        f"{experiment.name}: retention {old or 'none recorded'} -> {policy}; rotation "
        "applies it from the next commit; `baton ckpt prune` applies it now"
    )
    return 0


def cmd_verify(args) -> int:
    """Train an experiment's newest checkpoint (or B) again from the one before it (or A)
    and compare the result with it bit for bit. In this process, without Prefect or any
    network; nothing is written into the experiment. Exit 0 bitwise equal, 1 different,
    2 a pair that cannot be verified (said why, and what to verify instead)."""
    from baton.errors import BatonError

    paths = args.paths
    if len(paths) > 2:
        print("baton: verify takes an experiment folder, or two checkpoints A B", file=sys.stderr)
        return 2
    # The operator named the experiment here: its folder, and its work_dir for the
    # recorded config, are trusted in this process (as `baton run --work-dir` does).
    folder = Path(paths[-1]).expanduser().absolute()
    root = folder if len(paths) == 1 else folder.parent.parent
    for name, value in (
        ("BATON_WORK_DIR_ROOTS", root.parent),
        ("BATON_CHECKPOINT_ROOTS", root),
    ):
        current = [v for v in os.environ.get(name, "").split(os.pathsep) if v]
        os.environ[name] = os.pathsep.join([*current, str(value)])
    _trust_operator_flags(args)
    try:
        from baton.run.verify import verify_experiment

        verdict = verify_experiment(root, *(paths if len(paths) == 2 else ()))
    except BatonError as err:
        print(f"baton: {err}", file=sys.stderr)
        return 2
    print("\n".join(verdict.lines()))
    return 0 if verdict.equal else 1


def cmd_evaluate(args) -> int:
    _trust_operator_flags(args)

    def load():
        from baton.config import load_config, parse_overrides
        from baton.run import pipeline

        cfg = load_config(args.config, parse_overrides(args.set or []))
        _check_evaluation(cfg, args.checkpoint)  # one line, before Prefect starts
        import baton.flows.evaluate  # noqa: F401

        pipeline.preload()

    with _prefect_session(load):
        from baton.flows.evaluate import evaluate_checkpoint

        state = evaluate_checkpoint(
            checkpoint=args.checkpoint,
            config=args.config,
            overrides=args.set or None,
            return_state=True,
        )
        if not state.is_completed():
            print(f"baton: the evaluation ended {state.name}: {state.message}", file=sys.stderr)
            return 1
        metrics = state.result()
    for key, value in sorted(metrics.items()):
        print(f"{key:16} {value:.4f}")
    return 0


def _check_evaluation(cfg, checkpoint: str) -> None:
    """What can be told before any run: the config can evaluate, the file is a checkpoint."""
    from baton.checkpoint import sharded
    from baton.errors import CheckpointError, ConfigError
    from baton.experiment import Experiment
    from baton.flows.evaluate import NO_VAL_DATA
    from baton.trust import Trust

    if cfg.val_data is None:
        raise ConfigError(NO_VAL_DATA)
    uri = Trust.from_environment().check_checkpoint(
        checkpoint, experiment_dir=Experiment.of(cfg).root, what="checkpoint"
    )
    if "://" not in uri and Path(uri).is_dir():
        # a sharded checkpoint's folder (the trust check allows no other): whole, and
        # holding only regular files
        sharded.files_of(uri)
        return
    if "://" not in uri:
        with open(uri, "rb") as handle:
            head = handle.read(4)
        # torch.save writes a zip archive (or, in the legacy format, a pickle).
        if not (head.startswith(b"PK") or head[:1] == b"\x80"):
            raise CheckpointError(
                f"{checkpoint!r} is not a torch checkpoint (neither a zip archive nor a "
                "pickle); name a .pth file written by baton, mmengine or torch.save, or a "
                "sharded checkpoint's .dcp folder"
            )


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="pipeline config (YAML)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a config value"
    )


def _trust_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-module",
        action="append",
        metavar="PREFIX",
        help="trust a module prefix for dotted 'type' names (operator setting)",
    )
    parser.add_argument(
        "--allow-scheme",
        action="append",
        metavar="SCHEME",
        help="allow checkpoint URIs of this scheme, e.g. s3 (operator setting)",
    )


def _add_run(commands) -> None:
    run = commands.add_parser("run", help="train a pipeline (resumes automatically)")
    _config_args(run)
    run.add_argument("--experiment-name")
    run.add_argument("--resume", help="auto, never, or a checkpoint path")
    run.add_argument(
        "--fork",
        action="store_true",
        default=None,
        help="continue from the checkpoint even where the config changes the run; "
        "recorded as a fork (docs/resume.md)",
    )
    run.add_argument(
        "--work-dir", help="folder of all experiments (relative to here); default: the config's"
    )
    run.add_argument(
        "--nproc",
        type=_count,
        metavar="N",
        help="train on N processes, one per device (torchrun, DDP); default: the config's "
        "launcher.nproc (docs/distributed.md)",
    )
    _trust_args(run)
    run.set_defaults(func=cmd_run)


def _add_ckpt(commands) -> None:
    ckpt = commands.add_parser("ckpt", help="list, inspect, compare or prune checkpoints")
    ckpt_commands = ckpt.add_subparsers(dest="ckpt_command", required=True)
    listing = ckpt_commands.add_parser(
        "list", help="an experiment's checkpoints and their validity"
    )
    listing.add_argument("experiment_dir", type=Path)
    listing.set_defaults(func=cmd_ckpt_list)
    inspect_ = ckpt_commands.add_parser("inspect", help="what a checkpoint file holds")
    inspect_.add_argument("checkpoint")
    inspect_.set_defaults(func=cmd_ckpt_inspect)
    compare = ckpt_commands.add_parser(
        "diff", help="which tensors and metadata of two checkpoints differ, and by how much"
    )
    compare.add_argument("a", metavar="A")
    compare.add_argument("b", metavar="B")
    compare.add_argument(
        "--ignore",
        action="append",
        metavar="NAME",
        help="an entry, or a prefix of entries, not to compare (e.g. meta.time)",
    )
    compare.add_argument(
        "--limit", type=_count, default=50, metavar="N", help="show at most N differences"
    )
    compare.set_defaults(func=cmd_ckpt_diff)
    prune = ckpt_commands.add_parser(
        "prune", help="delete the committed checkpoints a retention policy does not keep"
    )
    prune.add_argument("experiment_dir", type=Path)
    prune.add_argument("--keep-last", type=_count, required=True, metavar="N")
    _best_args(prune)
    prune.add_argument("--lineage", metavar="NAME", help="only this lineage (L2); default: all")
    prune.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    prune.set_defaults(func=cmd_ckpt_prune)
    retention = ckpt_commands.add_parser(
        "retention", help="show or set the retention runs of an experiment rotate by"
    )
    retention.add_argument("experiment_dir", type=Path)
    retention.add_argument(
        "--keep-last", type=_count_or_all, metavar="N|all", help="set it: keep N newest per lineage"
    )
    _best_args(retention)
    retention.set_defaults(func=cmd_ckpt_retention)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _count_or_all(text: str) -> int | str:
    return text if text == "all" else _count(text)


def _best_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-best", type=int, default=0, metavar="K")
    parser.add_argument("--best-metric", metavar="METRIC", help="e.g. val/accuracy")
    parser.add_argument("--best-mode", choices=("max", "min"), default="max")


def build_parser() -> argparse.ArgumentParser:
    """The ``baton`` command line: one sub-parser per verb, each with its ``func``."""
    parser = argparse.ArgumentParser(
        prog="baton", description="Restartable PyTorch training pipelines on Prefect"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run(commands)

    check = commands.add_parser("validate", help="check a config; writes nothing")
    _config_args(check)
    _trust_args(check)
    check.set_defaults(func=cmd_validate)

    _add_ckpt(commands)

    report = commands.add_parser(
        "report", help="an experiment's history table, and its curves as a PNG"
    )
    report.add_argument("experiment_dir", help="the experiment's folder (work_dir/<name>)")
    report.add_argument(
        "--output",
        "-o",
        metavar="PNG",
        help="where to write the curves (default: ./<name>-curves.png)",
    )
    report.set_defaults(func=cmd_report)
    verify = commands.add_parser(
        "verify",
        help="train a checkpoint again from an earlier one and compare bit for bit",
        description="Rebuild the run from checkpoint A, train it to checkpoint B's position "
        "in memory and compare every tensor and value with B. Given an experiment folder: "
        "its newest checkpoint against the one before it. Exit 0 bitwise equal, 1 "
        "different, 2 a pair that cannot be verified.",
    )
    verify.add_argument(
        "paths", nargs="+", metavar="EXPERIMENT_DIR | A B", help="an experiment, or A and B"
    )
    _trust_args(verify)
    verify.set_defaults(func=cmd_verify)

    evaluate = commands.add_parser("evaluate", help="validation metrics of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--config", required=True)
    evaluate.add_argument("--set", action="append", metavar="KEY=VALUE")
    _trust_args(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``baton`` console script."""
    args = build_parser().parse_args(argv)
    work_dir = getattr(args, "work_dir", None)
    if work_dir and not work_dir.startswith("~"):
        # A path typed on the command line is relative to where the command runs (a
        # config's work_dir, to the project): the run gets it absolute.
        args.work_dir = str(Path(work_dir).resolve())
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
