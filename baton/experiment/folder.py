"""``Experiment``: the one owner of an experiment's folder, ``work_dir/<experiment_name>``.

Layout::

    checkpoints/        checkpoint files       } the checkpoint store's
    manifest.json       what was committed     } (baton.checkpoint.files
    manifest.journal    ... since the snapshot } names these paths)
    .lock               held by the process that trains the experiment
    experiment.json     what the experiment is: its retention, fixed when it was created
    metrics.jsonl       per-epoch and per-iteration metrics (baton.experiment.metrics)
    tensorboard/        TensorBoard event files (one per flow run)
    runs/               logs: runs/<timestamp>/ of each strategy, flow-<run id>.log of each
                        flow run, and restarts.json (baton.experiment.restarts)

The paths are joined here and nowhere else. The experiment holds the checkpoint store,
built once with the experiment's one retention policy; the strategy, the pipeline, the
tasks and the flow all reach the folder through it. Creating an ``Experiment`` touches
nothing on disk.
"""

import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Protocol

from baton.checkpoint.io import write_text_atomic
from baton.checkpoint.lock import in_place
from baton.checkpoint.store import CheckpointStore, RetentionPolicy
from baton.errors import RetentionConflictError, UntrustedInputError
from baton.experiment.metrics import MetricsLog
from baton.experiment.restarts import RestartLog
from baton.trust.allowances import Trust

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RECORD_MAX_BYTES = 64 << 10  # experiment.json is a few lines; a bigger one is not read

logger = logging.getLogger(__name__)


class KeepsCheckpoints(Protocol):
    """A config's checkpoint section, as :meth:`Experiment.of` reads it."""

    def retention(self) -> RetentionPolicy:
        """What rotation keeps of each lineage."""
        ...


class ExperimentSettings(Protocol):
    """What :meth:`Experiment.of` reads of a pipeline config: where and which experiment,
    and what it keeps. :class:`baton.config.PipelineConfig` is one; the config package
    builds on this one, never the other way round."""

    @property
    def work_dir(self) -> str: ...

    @property
    def experiment_name(self) -> str: ...

    @property
    def checkpoint(self) -> KeepsCheckpoints: ...


def check_experiment_name(name: str) -> str:
    """Return ``name`` if it is a safe folder name, else raise ``ValueError`` saying why."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"experiment_name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit, with no path separators and no '..'"
        )
    return name


class Experiment:
    """One experiment's folder and what lives in it (see the module docstring).

    Args:
        work_dir: The folder of all experiments (a relative one: to the working directory,
            as mmengine's; a pipeline's is resolved by :meth:`of`).
        name: The experiment's name, a safe folder name.
        retention: What checkpoint rotation keeps; by default every checkpoint (as
            mmengine's strategy does). A pipeline's comes from its config's ``checkpoint``
            section (:meth:`of`).

    Raises:
        ValueError: An unsafe experiment name.
    """

    def __init__(
        self, work_dir: str | Path, name: str, *, retention: RetentionPolicy | None = None
    ) -> None:
        self.work_dir = Path(work_dir).expanduser().absolute()
        self.name = check_experiment_name(name)
        self.root = self.work_dir / self.name
        self.store = CheckpointStore(self.root, retention=retention)
        self.metrics = MetricsLog(self.root / "metrics.jsonl", before_write=self.check_in_place)
        self.restarts = RestartLog(self.runs_dir / "restarts.json")

    @classmethod
    def of(cls, cfg: ExperimentSettings, trust: Trust | None = None) -> "Experiment":
        """The experiment a pipeline config trains, with the config's retention policy.

        A pipeline's ``work_dir`` is resolved as its config was checked: a relative one
        inside the project (:meth:`Trust.check_work_dir`), wherever the process runs.

        Raises:
            UntrustedInputError: ``work_dir`` is outside what the operator allows.
        """
        work_dir = (trust or Trust.from_environment()).check_work_dir(cfg.work_dir)
        return cls(work_dir, cfg.experiment_name, retention=cfg.checkpoint.retention())

    def __repr__(self) -> str:
        return f"Experiment({str(self.root)!r})"

    def check_home(self) -> None:
        """Refuse to make an experiment of a folder that is something else. Reads only.

        A missing or empty folder is a new experiment, one with a manifest an existing
        one; so is one that holds nothing but the experiment's own entries (a run that
        stopped before its first manifest). Anything else (a package, someone's data) is
        not written into.

        Raises:
            UntrustedInputError: ``root`` is not a folder, or a folder that is not an
                experiment's; the message says to choose another work_dir or name.
        """
        try:
            mode = os.lstat(self.root).st_mode
        except FileNotFoundError:
            return
        advice = "choose another work_dir or experiment_name"
        if not stat.S_ISDIR(mode):
            raise UntrustedInputError(
                f"experiment folder {str(self.root)!r} exists and is not a folder (a link "
                f"is not followed); {advice}"
            )
        own = {
            *self.store.entry_names,
            self.record_path.name,
            self.metrics.path.name,
            self.tensorboard_dir.name,
            self.runs_dir.name,
        }
        entries = set(os.listdir(self.root))
        if self.store.manifest_path.name in entries or entries <= own:
            return
        others = ", ".join(sorted(entries - own)[:5])
        raise UntrustedInputError(
            f"experiment folder {str(self.root)!r} is not an experiment: it has no "
            f"manifest.json and holds other files ({others}); {advice}"
        )

    def check_in_place(self) -> None:
        """Refuse to write when the folder at :attr:`root` is no longer the one this
        process locked (moved or deleted while the run trained): every writer of a run
        calls it first, so that nothing creates a second half of the experiment at the
        old path. Nothing is checked without the lock.

        Raises:
            ExperimentMovedError: Saying where the folder is now and how to resume it.
        """
        self.store.check_in_place()

    def in_place(self) -> bool:
        """:meth:`check_in_place` as a boolean."""
        return in_place(self.root)

    @property
    def retention(self) -> RetentionPolicy:
        """What rotation keeps of each lineage's checkpoints."""
        return self.store.retention

    def lock(self, *, wait: bool = False):
        """Hold the experiment's exclusive lock (see :meth:`CheckpointStore.lock`)."""
        return self.store.lock(wait=wait)

    @property
    def runs_dir(self) -> Path:
        """``runs/``: run logs and the restart log."""
        return self.root / "runs"

    def strategy_log_dir(self, timestamp: str) -> Path:
        """The log folder of a strategy created at ``timestamp``."""
        return self.runs_dir / timestamp

    def flow_log_path(self, run_id: str) -> Path:
        """The copy of a flow run's log lines."""
        return self.runs_dir / f"flow-{run_id}.log"

    @property
    def tensorboard_dir(self) -> Path:
        """TensorBoard's event files."""
        return self.root / "tensorboard"

    # what the experiment is (experiment.json) ----------------------------------------------

    @property
    def record_path(self) -> Path:
        """``experiment.json``: the experiment's retention, fixed when it was created."""
        return self.root / "experiment.json"

    def recorded_retention(self) -> RetentionPolicy | None:
        """The retention the experiment was created with; ``None`` for an experiment no
        pipeline created (the strategy used as a library) or one made before baton
        recorded it.

        Raises:
            RetentionConflictError: ``experiment.json`` is there but unreadable.
        """
        try:
            fd = os.open(self.record_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise self._unreadable(os.strerror(err.errno) if err.errno else str(err)) from err
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise self._unreadable("not a regular file")
            data = os.read(fd, _RECORD_MAX_BYTES + 1)
        finally:
            os.close(fd)
        try:
            if len(data) > _RECORD_MAX_BYTES:
                raise ValueError(f"larger than {_RECORD_MAX_BYTES} bytes")
            return RetentionPolicy.from_record(json.loads(data)["retention"])
        except (ValueError, KeyError, TypeError) as err:
            raise self._unreadable(str(err)) from err

    def _unreadable(self, why: str) -> RetentionConflictError:
        return RetentionConflictError(
            f"{self.record_path} is unreadable ({why}), so the experiment's retention is "
            "unknown and nothing is rotated; check it, or have an operator set it again: "
            f"baton ckpt retention {self.root} --keep-last N"
        )

    def check_retention(self, asked: RetentionPolicy) -> RetentionPolicy:
        """Hold a run to the retention the experiment was created with, writing nothing:
        the store applies it from now on. :meth:`fix_retention` records it once the run's
        checks have all passed.

        A new experiment, or one made before baton recorded retention, takes ``asked``.
        Otherwise ``asked`` must be the recorded policy: a run adds to an experiment and
        cannot change which of its earlier checkpoints rotation deletes (an operator can:
        :meth:`set_retention`, ``baton ckpt retention``).

        Returns:
            The experiment's retention.

        Raises:
            RetentionConflictError: ``asked`` differs from the recorded policy.
        """
        asked = asked.normalised()
        recorded = self.recorded_retention()
        if recorded is not None and recorded != asked:
            raise RetentionConflictError(
                f"experiment {self.name} keeps {recorded} (its retention, fixed when it was "
                f"created), and this run asks for {asked}: a run cannot change which "
                "checkpoints an experiment keeps. Remove the run's checkpoint.keep_last/"
                "keep_best/best_metric/best_mode override, or have an operator change the "
                f"experiment's retention: baton ckpt retention {self.root} "
                f"{retention_flags(asked)}"
            )
        self.store.retention = asked
        return asked

    def fix_retention(self, asked: RetentionPolicy) -> RetentionPolicy:
        """:meth:`check_retention`, then record ``asked`` in ``experiment.json`` if the
        experiment records none yet; call it under the experiment's lock, once the run's
        checks have passed (a refused run writes nothing), before its first commit.

        An experiment made before baton recorded retention adopts ``asked`` (the first
        run's), and says so in the log.

        Returns:
            The experiment's retention, which the store now applies.

        Raises:
            RetentionConflictError: ``asked`` differs from the recorded policy.
        """
        asked = self.check_retention(asked)
        if self.recorded_retention() is not None:
            return asked
        if self.store.manifest_path.exists() or self.store.journal_path.exists():
            logger.warning(
                "experiment %s records no retention (made before baton recorded it): "
                "adopting this run's, %s; later runs must ask for the same, or an "
                "operator changes it with `baton ckpt retention %s`",
                self.name,
                asked,
                self.root,
            )
        self.set_retention(asked)
        return asked

    def set_retention(self, policy: RetentionPolicy) -> None:
        """Record ``policy`` as the experiment's retention (an operator's command, or the
        run that creates the experiment); call it under the experiment's lock. Rotation
        applies it from the next commit on; ``baton ckpt prune`` applies it now."""
        record = {"version": 1, "retention": policy.as_record()}
        self.check_in_place()
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.record_path, json.dumps(record, indent=1) + "\n")
        self.store.retention = policy.normalised()

    def ran(self, run_id: str) -> bool:
        """Whether the flow run ``run_id`` trained this experiment: its log
        (:meth:`flow_log_path`, written once the run held the lock) is here. ``run_id`` may
        come from a run's parameters: anything but a plain id is ``False``."""
        if not isinstance(run_id, str) or not _NAME_RE.match(run_id) or ".." in run_id:
            return False
        try:
            return stat.S_ISREG(os.lstat(self.flow_log_path(run_id)).st_mode)
        except OSError:
            return False


def retention_flags(policy: RetentionPolicy) -> str:
    """``policy`` as the options of ``baton ckpt retention`` and ``baton ckpt prune``."""
    keep_last = "all" if policy.keep_last is None else policy.keep_last
    flags = f"--keep-last {keep_last}"
    if policy.keep_best:
        flags += (
            f" --keep-best {policy.keep_best} --best-metric {policy.best_metric} "
            f"--best-mode {policy.best_mode}"
        )
    return flags
