"""The bound on automatic restarts of an experiment, so a crash loop stops and says so.

A run that crashes is started again by an automation (``deployments/automations.yaml``).
If it crashes every time (a poisoned batch, an out-of-memory at the same step), that
would go on for ever. Each automatic restart therefore claims one slot in the
experiment's restart log, ``runs/restarts.json``, under the experiment's lock; when
``limit`` restarts already happened within ``window``, the claim is refused and the run
ends Failed (which the automation does not restart) with a message that says why. A
crashed run is restarted once: another run that claims to continue it is refused too.

The bound is the operator's: ``BATON_RESTART_LIMIT`` (default 3) and
``BATON_RESTART_WINDOW_HOURS`` (default 24) in the worker's environment, never a run's
parameters or job variables.
"""

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from baton.checkpoint.io import write_text_atomic
from baton.errors import RestartRefusedError

DEFAULT_LIMIT = 3  # automatic restarts allowed per experiment within the window
DEFAULT_WINDOW = timedelta(hours=24)


@dataclass(frozen=True)
class RestartBound:
    """At most ``limit`` automatic restarts of one experiment within ``window``."""

    limit: int = DEFAULT_LIMIT
    window: timedelta = DEFAULT_WINDOW

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "RestartBound":
        """The operator's bound, from ``BATON_RESTART_LIMIT`` and ``BATON_RESTART_WINDOW_HOURS``.

        Raises:
            ValueError: A variable is set to something other than a non-negative number.
        """
        environ = os.environ if environ is None else environ
        limit = environ.get("BATON_RESTART_LIMIT", str(DEFAULT_LIMIT))
        hours = environ.get("BATON_RESTART_WINDOW_HOURS", str(DEFAULT_WINDOW / timedelta(hours=1)))
        try:
            bound = cls(limit=int(limit), window=timedelta(hours=float(hours)))
        except ValueError as err:
            raise ValueError(
                f"BATON_RESTART_LIMIT={limit!r} / BATON_RESTART_WINDOW_HOURS={hours!r}: set "
                "them to a whole number of restarts and a number of hours, e.g. 3 and 24"
            ) from err
        if bound.limit < 0 or bound.window < timedelta(0):
            raise ValueError(
                f"BATON_RESTART_LIMIT={limit!r} / BATON_RESTART_WINDOW_HOURS={hours!r} must "
                "not be negative; set BATON_RESTART_LIMIT=0 to switch automatic restarts off"
            )
        return bound


@dataclass(frozen=True)
class Restart:
    """One automatic restart: when, which run, and the crashed run it continues (its
    name, shown in messages, and its id, which tells two runs of one name apart)."""

    time: datetime
    run: str
    continues: str
    continues_id: str | None = None

    def same_crash(self, continues: str, continues_id: str | None) -> bool:
        """Whether this restart continued the crashed run ``continues_id`` (or, for a
        record or a claim without an id, the run called ``continues``)."""
        if self.continues_id is not None and continues_id is not None:
            return self.continues_id == continues_id
        return self.continues == continues


class RestartLog:
    """The automatic restarts of one experiment, in the file ``path`` (the experiment's
    ``runs/restarts.json``: :attr:`Experiment.restarts <baton.experiment.Experiment.restarts>`).

    Callers hold the experiment's lock, so reading, counting and writing cannot interleave
    with another run of the same experiment.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def restarts(self) -> list[Restart]:
        """Every restart recorded, oldest first.

        Raises:
            RestartRefusedError: The log cannot be read; restarting blind could loop for ever.
        """
        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))["restarts"]
            return [
                Restart(
                    datetime.fromisoformat(r["time"]),
                    str(r["run"]),
                    str(r["continues"]),
                    str(r["continues_id"]) if r.get("continues_id") else None,
                )
                for r in records
            ]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RestartRefusedError(
                f"the restart log {self.path} is unreadable ({err}); check it, delete it to "
                "allow automatic restarts again, and start the run by hand"
            ) from err

    def claim(
        self,
        run: str,
        continues: str,
        bound: RestartBound,
        now: datetime | None = None,
        *,
        continues_id: str | None = None,
    ) -> int:
        """Record that ``run`` restarts the crashed run ``continues``, within ``bound``.

        Claiming again for the same ``run`` (a flow retry) counts once. A crashed run is
        restarted once: another run that claims to continue it (anyone can name a crashed
        run in a run's ``restart_of``) is refused before anything is counted, so it cannot
        spend the experiment's restarts.

        Returns:
            How many restarts of this experiment lie within the window, this one included.

        Raises:
            RestartRefusedError: ``bound.limit`` restarts already happened within the window,
                or another run already restarted ``continues``.
        """
        now = now or datetime.now(UTC)
        continues = continues[:200]  # a run's parameter: bounded before it is stored
        continues_id = continues_id[:200] if continues_id else None
        recent = [r for r in self.restarts() if now - r.time < bound.window]
        if any(r.run == run for r in recent):
            return len(recent)
        earlier = next((r for r in recent if r.same_crash(continues, continues_id)), None)
        if earlier is not None:
            raise RestartRefusedError(
                f"crashed run {continues!r} was already restarted by run {earlier.run!r}; "
                "a crashed run is restarted once. Follow that run, or start it by hand"
            )
        if len(recent) >= bound.limit:
            if not recent:
                raise RestartRefusedError(
                    f"not restarting {continues!r}: automatic restarts are off "
                    "(BATON_RESTART_LIMIT=0); start the run by hand"
                )
            times = f"{len(recent)} time{'s' if len(recent) > 1 else ''}"
            raise RestartRefusedError(
                f"not restarting {continues!r}: the experiment was restarted automatically "
                f"{times} in {bound.window / timedelta(hours=1):g} h (after "
                f"{', '.join(r.continues for r in recent)}), the limit (BATON_RESTART_LIMIT="
                f"{bound.limit}); find the cause in its runs/ logs, then start it by hand"
            )
        recent.append(Restart(now, run, continues, continues_id))
        records = [
            {"time": r.time.isoformat(), "run": r.run, "continues": r.continues}
            | ({"continues_id": r.continues_id} if r.continues_id else {})
            for r in recent
        ]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"restarts": records}, indent=1) + "\n")
        return len(recent)
