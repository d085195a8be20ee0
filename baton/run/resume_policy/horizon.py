"""Schedulers across a moved horizon: what a resume to another ``max_epochs``/``max_iters``
does with the schedulers whose window or curve defaulted to the horizon.

mmengine's schedulers take ``end`` from the horizon when the config gives none, and some
take their curve's length from it too (cosine's ``T_max``, one-cycle's ``total_steps``,
the ``total_iters`` of poly, linear and constant). A scheduler's state records them, so a
checkpoint of a run to 3 epochs holds ``end=3``; restored as it is, a run raised to 10
epochs would never reach milestone 8. This module compares each saved state with the
state the same config builds at the new horizon (the pipeline's fresh schedulers): the
values that differ are the ones the horizon decided, since every other key of the config
is the same (or the resume was refused or forked before).

* Only ``end`` differs: the curve does not depend on the horizon, so the run continues
  with the new ``end``. When the old ``end`` stopped the scheduler right at the
  checkpoint's position (a run to 3 epochs skips its step after epoch 3, milestone 3
  included), that step is taken again after loading, as an uninterrupted run took it.
* Anything else differs (``T_max``, ``total_steps``, ``total_iters``), and the scheduler
  has begun: its curve stretches with the horizon, so the epochs already trained differ
  from those of a run to the new horizon and no continuation can be exact. The resume
  is refused, naming the scheduler; a fork continues with the new curve.

A key the config gives explicitly is the same in both states, so the horizon never
changes it. A plateau scheduler's one moment is the validation after an epoch: its skipped
judgement is made again with the metrics the checkpoint recorded.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from baton.optim.schedulers import _ParamScheduler

# State keys that record progress along the schedule (and the values it was applied to),
# never the schedule's shape.
_PROGRESS_KEYS = frozenset(
    {
        "last_step",
        "_global_step",
        "_last_value",
        "base_values",
        "min_values",
        "best",
        "num_bad_epochs",
        "cooldown_counter",
    }
)


@dataclass
class HorizonMove:
    """What a resume to another horizon changes in the saved scheduler states.

    Attributes:
        states: The saved states with ``end`` (and, for a scheduler not yet begun, its
            curve's length) taken from the new horizon; load these instead.
        retake: Indices of the schedulers whose step at the checkpoint's position the
            old ``end`` skipped: take it again after loading (:meth:`retake_steps`).
        problems: Why the move cannot be exact, one entry per scheduler (empty: it is).
    """

    states: list[dict]
    retake: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def retake_steps(self, schedulers: Sequence[_ParamScheduler], val_metrics: dict) -> None:
        """Take the skipped steps on the loaded schedulers, in the order the loop takes
        them (iteration-based, epoch-based, then the plateau schedulers' judgement).

        Args:
            val_metrics: The validation metrics the checkpoint recorded, as the plateau
                schedulers read them.
        """
        for index in sorted(self.retake, key=lambda i: _moment(schedulers[i], i)):
            scheduler = schedulers[index]
            if _is_plateau(scheduler):
                scheduler.step(val_metrics)
            else:
                scheduler._take_step()


def move_horizon(
    saved: Sequence[dict],
    fresh: Sequence[_ParamScheduler],
    *,
    epoch_end: bool,
    validated: bool,
) -> HorizonMove:
    """Compare saved scheduler states with the schedulers built at the new horizon.

    Args:
        saved: The checkpoint's ``param_schedulers``, one state per scheduler.
        fresh: The schedulers the config builds at the new horizon, not yet stepped.
        epoch_end: The checkpoint was taken at the end of an epoch (epoch-based
            schedulers stepped there).
        validated: That epoch was validated (plateau schedulers judged it).
    """
    states = [dict(state) for state in saved]
    move = HorizonMove(states)
    for index, (state, scheduler) in enumerate(zip(states, fresh, strict=True)):
        new = scheduler.state_dict()
        moved = {
            key: (state[key], new[key])
            for key in state.keys() & new.keys() - _PROGRESS_KEYS
            if _plain(state[key]) != _plain(new[key])
        }
        if not moved:
            continue
        name = f"param_scheduler.{index} ({type(scheduler).__name__})"
        shaped = {key: values for key, values in moved.items() if key != "end"}
        if shaped and int(state.get("last_step", -1)) >= 0:
            shown = {k: v for k, v in shaped.items() if not k.startswith("_")} or shaped
            move.problems.append(
                f"{name} follows the horizon ("
                + ", ".join(f"{key} {old} -> {value}" for key, (old, value) in shown.items())
                + "), so the steps it took already differ from a run to the new horizon"
            )
            continue
        state.update({key: value for key, (_, value) in moved.items()})
        if _skipped_at_position(state, moved, scheduler, epoch_end, validated):
            move.retake.append(index)
    move.problems.extend(_out_of_order(move.retake, states, fresh, epoch_end, validated))
    return move


def _skipped_at_position(
    state: dict, moved: dict, scheduler: _ParamScheduler, epoch_end: bool, validated: bool
) -> bool:
    """True when the old ``end`` kept the scheduler from its step at the position."""
    if "end" not in moved or not _stepped_at_position(scheduler, epoch_end, validated):
        return False
    position = int(state["_global_step"])
    old_end, new_end = moved["end"]
    return state["begin"] <= position and old_end <= position < new_end


def _stepped_at_position(scheduler: _ParamScheduler, epoch_end: bool, validated: bool) -> bool:
    if _is_plateau(scheduler):
        return epoch_end and validated
    return epoch_end or not scheduler.by_epoch


def _out_of_order(
    retake: list[int],
    states: list[dict],
    fresh: Sequence[_ParamScheduler],
    epoch_end: bool,
    validated: bool,
) -> list[str]:
    """Retaken steps that would land after a step an uninterrupted run took later.

    Schedulers of one parameter chain: each step changes the value the previous one left.
    A retaken step comes after every step the run took at that position, so it is exact
    only if no later scheduler of the same parameter acted there.
    """
    problems = []
    for index in retake:
        scheduler = fresh[index]
        for other, later in enumerate(fresh):
            if (
                other in retake
                or later.param_name != scheduler.param_name
                or _moment(later, other) < _moment(scheduler, index)
                or not _stepped_at_position(later, epoch_end, validated)
            ):
                continue
            state = states[other]
            if state["begin"] <= int(state["_global_step"]) < state["end"]:
                problems.append(
                    f"param_scheduler.{index} ({type(scheduler).__name__}) stopped at the old "
                    f"horizon just before a step that param_scheduler.{other} "
                    f"({type(later).__name__}) took after it; the two cannot be put back in "
                    "order"
                )
    return problems


def _moment(scheduler: _ParamScheduler, index: int) -> tuple[int, int]:
    """Where a scheduler steps at the end of an epoch: iteration-based ones first, then
    epoch-based ones, then the plateau schedulers after validation; each in list order."""
    if _is_plateau(scheduler):
        return 2, index
    return (1 if scheduler.by_epoch else 0), index


def _is_plateau(scheduler: _ParamScheduler) -> bool:
    return bool(getattr(scheduler, "need_val_args", False))


def _plain(value):
    """Tuples as lists, so a state that went through a file compares with a fresh one."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
