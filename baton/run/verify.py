"""Proof that a checkpoint was trained as its lineage says: rebuild the run from an earlier
checkpoint A, train it again to the later checkpoint B's position, and compare the state
reached with B, entry by entry and bit for bit.

Everything a checkpoint holds is compared (:mod:`baton.checkpoint.compare`): the model,
the optimizer, the schedulers, every RNG state (python, numpy, torch, CUDA), the position,
the running and recorded metrics, the history, the forks. The loader's streams (each
worker's included) are a function of (seed, epoch, sample index), so comparing the seed
and the position compares them. B is read through a memory map, a tensor at a time.

The replay uses B's own recorded config (``meta.config``) and the same steps a run takes
(:func:`baton.run.steps.resume`, ``train_one_epoch``, ``evaluate``): a fork is resumed as
the fork it was. It trains into memory: the pipeline's folder is a temporary one outside
the experiment, nothing is committed, and the experiment is only read.

Refused (:class:`~baton.errors.VerificationRefusedError`, each with what to do instead):
a checkpoint not committed in the experiment, a pair not of one lineage or in the wrong
order, a pair that spans more than one lineage change, and a B trained in an environment
that differs from this one in a way that breaks bitwise equality (see
:mod:`baton.engine.fingerprint`).
"""

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from baton.checkpoint import compare, io
from baton.checkpoint.lineage import Lineage
from baton.checkpoint.mapped import MappedCheckpoint
from baton.checkpoint.ref import CheckpointRef
from baton.config.loading import load_config
from baton.engine import fingerprint
from baton.errors import VerificationRefusedError
from baton.experiment.folder import Experiment
from baton.run import control, steps
from baton.run.live import Pipeline, build_pipeline
from baton.trust.allowances import Trust, held_trust

logger = logging.getLogger(__name__)

# Entries that say when and with which baton a file was written, not what was trained;
# the environment is compared field by field before the replay.
NOT_COMPARED = ("meta.time", "meta.baton", f"meta.{fingerprint.ENVIRONMENT_KEY}")
# Differences listed in a verdict; the count says how many more there are.
SHOWN = 20


@dataclass
class Verdict:
    """The outcome of a verification.

    Attributes:
        a, b: The checkpoints, as committed.
        compared: Entries compared (tensors and plain values).
        differences: The first :data:`SHOWN` entries that differ, in checkpoint order
            (model first, then optimizer, schedulers, meta).
        total: All entries that differ.
        notes: What the reader should know (environment changes that do not break
            exactness, a fingerprint missing from an old checkpoint).
    """

    a: CheckpointRef
    b: CheckpointRef
    compared: int = 0
    differences: list[compare.Difference] = field(default_factory=list)
    total: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """Whether the replay reached B bit for bit."""
        return self.total == 0

    def headline(self) -> str:
        """One line: the verdict."""
        pair = f"{Path(self.a.uri).name} -> {Path(self.b.uri).name}"
        if self.equal:
            return (
                f"bitwise equal: training {pair} again (iteration {self.a.iter} to "
                f"{self.b.iter}) reproduces all {self.compared} entries of "
                f"{Path(self.b.uri).name}"
            )
        return (
            f"DIFFERS: training {pair} again gives {self.total} of {self.compared} entries "
            f"other than {Path(self.b.uri).name}"
        )

    def summary(self) -> dict:
        """The verdict as a small JSON-able value (what the Prefect task returns)."""
        return {
            "equal": self.equal,
            "a": self.a.model_dump(mode="json"),
            "b": self.b.model_dump(mode="json"),
            "compared": self.compared,
            "differ": self.total,
            "differences": [str(d) for d in self.differences],
            "notes": list(self.notes),
            "verdict": self.headline(),
            "markdown": self.markdown(),
        }

    def lines(self) -> list[str]:
        """The verdict as text: the headline, the first differences, the notes."""
        out = [self.headline()]
        out += [f"  {difference}" for difference in self.differences]
        if self.total > len(self.differences):
            out.append(f"  ... and {self.total - len(self.differences)} more")
        out += [f"note: {note}" for note in self.notes]
        return out

    def markdown(self) -> str:
        """The verdict as markdown (the flow's artifact), every value escaped."""
        from baton import markdown as md

        parts = [
            f"## {'Bitwise equal' if self.equal else 'Differs'}",
            md.text(self.headline()),
            "\n".join(
                f"- {side}: {md.inline_code(ref.uri)} (epoch {ref.epoch}, iteration "
                f"{ref.iter}, sha256 {md.inline_code(ref.sha256[:12])})"
                for side, ref in (("A", self.a), ("B", self.b))
            ),
        ]
        if not self.equal:
            rows = [
                f"| {md.inline_code(d.name)} | {md.table_cell(str(d).split(': ', 1)[1])} |"
                for d in self.differences
            ]
            parts.append("\n".join(["| entry | difference |", "|---|---|", *rows]))
            if self.total > len(self.differences):
                parts.append(md.text(f"... and {self.total - len(self.differences)} more"))
        parts += [f"> {md.text(note)}" for note in self.notes]
        return "\n\n".join(parts)


def _same(x: CheckpointRef, y: CheckpointRef) -> bool:
    return (x.uri, x.sha256) == (y.uri, y.sha256)


def _lineage_of(lineages: list[Lineage], ref: CheckpointRef) -> Lineage:
    return next(lineage for lineage in lineages if any(_same(c, ref) for c in lineage.checkpoints))


def _committed(experiment: Experiment, uri: str, what: str) -> CheckpointRef:
    ref = experiment.store.find(str(Path(uri).expanduser().absolute()))
    if ref is None:
        raise VerificationRefusedError(
            f"{what} {uri} is not a committed checkpoint of experiment {experiment.name}; "
            f"verify compares committed checkpoints (list them: baton ckpt list "
            f"{experiment.root})"
        )
    return ref


def pair_of(
    experiment: Experiment, a: str | None = None, b: str | None = None
) -> tuple[CheckpointRef, CheckpointRef]:
    """The pair to verify: ``a`` and ``b`` (files of the experiment), or, with neither,
    the newest checkpoint and the one before it in its lineage (or the checkpoint its
    lineage started from).

    Raises:
        VerificationRefusedError: A file is not committed in the experiment; there are
            fewer than two checkpoints; B is not later than A in one lineage; or the pair
            spans more than the change of lineage at B's lineage's start.
    """
    lineages = experiment.store.lineages()
    if (a is None) != (b is None):
        raise VerificationRefusedError("name both checkpoints A and B, or neither")
    if b is None:
        newest = experiment.store.latest()
        if newest is None:
            raise VerificationRefusedError(
                f"experiment {experiment.name} has no valid committed checkpoint to verify; "
                "train it first"
            )
        second = _lineage_of(lineages, newest)
        earlier = [c for c in second.checkpoints if c.iter < newest.iter]
        before = earlier[-1] if earlier else second.parent
        if before is None:
            raise VerificationRefusedError(
                f"{Path(newest.uri).name} is the first checkpoint of experiment "
                f"{experiment.name}; verify needs an earlier one (train on, or name A and B)"
            )
        return before, newest
    first, second = _committed(experiment, a, "A"), _committed(experiment, b, "B")
    _check_order(lineages, first, second)
    return first, second


def _check_order(lineages: list[Lineage], a: CheckpointRef, b: CheckpointRef) -> None:
    name_a, name_b = Path(a.uri).name, Path(b.uri).name
    if b.iter <= a.iter:
        raise VerificationRefusedError(
            f"B ({name_b}, iteration {b.iter}) is not later than A ({name_a}, iteration "
            f"{a.iter}); name the earlier checkpoint first"
        )
    home = _lineage_of(lineages, b)
    if any(_same(c, a) for c in home.checkpoints) or (
        home.parent is not None and _same(home.parent, a)
    ):
        return
    ancestors, parent = [], home.parent
    while parent is not None:
        lineage = _lineage_of(lineages, parent)
        ancestors.append((lineage, parent))
        parent = lineage.parent
    for lineage, _ in ancestors:
        if any(_same(c, a) for c in lineage.checkpoints):
            start = Path(home.parent.uri).name
            raise VerificationRefusedError(
                f"{name_a} (L{lineage.id}) and {name_b} (L{home.id}) are of one line, but "
                f"L{home.id} started ({home.reason}) from {start}: verify {name_a} -> "
                f"{start} and {start} -> {name_b} separately"
            )
    raise VerificationRefusedError(
        f"{name_a} (L{_lineage_of(lineages, a).id}) and {name_b} (L{home.id}) are not of one "
        f"lineage: {name_b} does not descend from {name_a}; pick A from {name_b}'s lineage "
        "(baton ckpt list shows them)"
    )


def _check_environment(b_meta: dict, a_meta: dict, current: dict, notes: list[str]) -> None:
    saved = b_meta.get(fingerprint.ENVIRONMENT_KEY)
    changes = fingerprint.fingerprint_changes(saved, current)
    if changes is None:
        notes.append(
            "B records no environment fingerprint (an older baton wrote it): if this "
            "machine differs from the one that trained it, a difference may be the "
            "environment's"
        )
    broken = fingerprint.breaking(changes)
    if broken:
        threads = [c.before for c in broken if c.field == "cpu_threads"]
        raise VerificationRefusedError(
            "B was trained in an environment that differs from this one in a way that breaks "
            f"bitwise equality: {fingerprint.describe(broken)}. Run baton verify where B was "
            "trained (same torch build, device and flags"
            + (f", OMP_NUM_THREADS={threads[0]}" if threads else "")
            + ")"
        )
    if changes:
        notes.append(
            f"environment differs, not in a way that breaks exactness: {changes_text(changes)}"
        )
    if isinstance(saved, dict):
        between = fingerprint.breaking(
            fingerprint.fingerprint_changes(a_meta.get(fingerprint.ENVIRONMENT_KEY), saved)
        )
        if between:
            notes.append(
                f"A and B were trained in environments that differ ({changes_text(between)}): "
                "the stretch between them may have been trained in either, so a difference "
                "may be the environment's"
            )


def changes_text(changes: list[fingerprint.FingerprintChange]) -> str:
    """The changes, comma-separated."""
    return ", ".join(map(str, changes))


def _replay(pipeline: Pipeline, b_meta: dict, b: CheckpointRef) -> dict[str, float]:
    """Train from the resumed position to B's as the run did (evaluating where it
    evaluated, recording the history where it saved an epoch); return the metrics B's
    save recorded."""
    strategy, cfg = pipeline.strategy, pipeline.config
    metrics: dict[str, float] = {}
    while strategy.iter < b.iter:
        metrics = steps.train_one_epoch(pipeline, stop_at=b.iter, save_iterations=False)
        if strategy.step_in_epoch:
            break  # B is inside this epoch
        plan = control.plan_after_epoch(cfg, strategy.epoch, pipeline.finished)
        at_b = strategy.iter == b.iter
        validated = any(k.startswith("val/") for k in b_meta.get("metrics") or {})
        if plan.evaluate and (not at_b or validated):
            metrics.update(steps.evaluate(pipeline))
        if plan.save and not at_b:
            steps.add_to_history(pipeline, metrics)
    if strategy.step_in_epoch:
        # Inside an epoch: an iteration checkpoint records the running metrics, an
        # emergency save none.
        running = {f"train/{k}": v for k, v in pipeline.meter.result().items()}
        metrics = running if b_meta.get("metrics") else {}
    history = b_meta.get("history") or []
    if history and (history[-1].get("epoch"), history[-1].get("iter")) == (b.epoch, b.iter):
        steps.add_to_history(pipeline, metrics)  # B was an epoch's save
    return metrics


def _replayed_checkpoint(pipeline: Pipeline, metrics: dict[str, float]) -> dict:
    """The checkpoint a save at this position would write, built in memory."""
    with pipeline.rng.active():
        return pipeline.strategy.checkpoint_dict(
            save_optimizer=pipeline.config.checkpoint.save_optimizer,
            extra_ckpt={"meta": steps.checkpoint_meta(pipeline, metrics)},
        )


def verify(
    experiment: Experiment,
    a: CheckpointRef,
    b: CheckpointRef,
    *,
    trust: Trust | None = None,
    work_dir: str | None = None,
) -> Verdict:
    """Train from A to B's position again, in memory, and compare the result with B.

    Args:
        experiment: The experiment both are committed in (read, never written).
        a, b: The pair, as :func:`pair_of` returns it.
        trust: The operator's trust (default: the environment's).
        work_dir: Validate B's config with this ``work_dir`` instead of its own (a
            deployment's run may name only its own folder; nothing is written there
            either). ``work_dir`` says where an experiment lives, not what it trains: the
            comparison leaves out ``meta.config.work_dir`` and checks instead that B's
            config hash is the replayed config's with B's ``work_dir`` put back.

    Raises:
        VerificationRefusedError: B records no config, or its environment breaks bitwise
            equality with this one.
        CheckpointCorruptError: A or B no longer matches its manifest entry.
        ConfigError: B's recorded config does not validate here (an operator setting
            it needs is missing).
    """
    with held_trust(trust):
        trust = trust or Trust.from_environment()
        store = experiment.store
        store.verify(a)
        store.verify(b)
        with io.expect_bytes(b.uri, b.size, b.sha256):
            b_file = MappedCheckpoint(b.uri)
        b_meta = b_file.checkpoint.get("meta") if isinstance(b_file.checkpoint, dict) else None
        if not isinstance(b_meta, dict) or not isinstance(b_meta.get("config"), dict):
            raise VerificationRefusedError(
                f"{Path(b.uri).name} records no pipeline config (meta.config): it was not "
                "written by a baton pipeline, so its run cannot be rebuilt; compare two files "
                "with baton ckpt diff instead"
            )
        processes = int(b_meta.get("world_size") or 1)
        if processes != 1:
            raise VerificationRefusedError(
                f"{Path(b.uri).name} was written by {processes} processes, and verify replays "
                "in one, where the gradients are summed in another order: bitwise equality "
                "cannot hold (docs/distributed.md); verify a lineage trained on one process, "
                "or compare two checkpoints with baton ckpt diff"
            )
        recorded = b_meta["config"]
        moved = work_dir is not None and work_dir != recorded.get("work_dir")
        cfg = load_config({**recorded, "work_dir": work_dir} if moved else recorded, trust=trust)
        a_meta = io.load_meta(a.uri)
        with tempfile.TemporaryDirectory(prefix="baton-verify-") as workspace:
            # The replay's own folder: its strategy's log, and nothing else, goes there.
            pipeline = build_pipeline(cfg, Experiment(workspace, cfg.experiment_name), trust=trust)
            try:
                verdict = Verdict(a, b)
                current = pipeline.strategy.environment_fingerprint()
                _check_environment(b_meta, a_meta, current, verdict.notes)
                steps.resume(pipeline, a)
                metrics = _replay(pipeline, b_meta, b)
                replayed = _replayed_checkpoint(pipeline, metrics)
            finally:
                pipeline.train_loader.close()
                if pipeline.val_loader is not None:
                    pipeline.val_loader.close()
        ignore = NOT_COMPARED
        if moved:
            ignore += ("meta.config.work_dir", "meta.config_hash")
            ran = cfg.model_copy(update={"work_dir": recorded.get("work_dir")}).config_hash
            if ran != b_meta.get("config_hash"):
                verdict.notes.append("meta.config_hash differs from the replayed config's")
                verdict.total += 1
                verdict.differences.append(
                    compare.Difference(
                        "meta.config_hash", "value", f"{ran[:12]} vs {b_meta.get('config_hash')}"
                    )
                )
        _compare(verdict, replayed, b_file, ignore)
    logger.info("verify %s", verdict.headline())
    return verdict


def _counted(entries: Iterator, counter: list[int], ignore: tuple[str, ...]) -> Iterator:
    for name, value in entries:
        if not any(name == p or name.startswith(p + ".") for p in ignore):
            counter[0] += 1
        yield name, value


def _compare(
    verdict: Verdict, replayed: dict, b_file: MappedCheckpoint, ignore: tuple[str, ...]
) -> None:
    counter = [0]
    found = compare.diff(
        _counted(compare.entries(replayed), counter, ignore),
        b_file.entries(),
        ignore=ignore,
        release_b=b_file.release,
    )
    for difference in found:
        verdict.total += 1
        if len(verdict.differences) < SHOWN:
            verdict.differences.append(difference)
    verdict.compared = counter[0]


def verify_experiment(
    experiment_dir: str | Path,
    a: str | None = None,
    b: str | None = None,
    *,
    work_dir: str | None = None,
) -> Verdict:
    """Verify a pair of an experiment's checkpoints (``a`` and ``b``, or its newest and
    the one before): the entry of the CLI, the task and the flow.

    The experiment's checkpoints must lie inside the operator's checkpoint roots
    (``BATON_CHECKPOINT_ROOTS``, a deployment's ``checkpoint_roots``): the folder comes
    from a user, as any checkpoint path does.

    Raises:
        VerificationRefusedError: As :func:`pair_of` and :func:`verify`, or the folder
            holds no experiment.
        UntrustedInputError: The checkpoints are outside the operator's roots.
    """
    with held_trust():
        trust = Trust.from_environment()
        path = Path(experiment_dir).expanduser().absolute()
        try:
            experiment = Experiment(path.parent, path.name)
        except ValueError as err:
            raise VerificationRefusedError(f"{path} is not an experiment folder: {err}") from err
        if not experiment.store.manifest_path.exists():
            raise VerificationRefusedError(
                f"{path} holds no experiment (no manifest.json); name an experiment's folder "
                "(work_dir/<experiment_name>) or two of its checkpoint files"
            )
        first, second = pair_of(experiment, a, b)
        for ref in (first, second):
            trust.check_checkpoint(ref.uri, experiment_dir=None, what="checkpoint to verify")
        return verify(experiment, first, second, trust=trust, work_dir=work_dir)
