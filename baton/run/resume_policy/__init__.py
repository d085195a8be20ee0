"""What may change between a checkpoint's config and the config that resumes it.

A resumed run continues the run that wrote the checkpoint, so its config must describe
the same run. Every key of :class:`~baton.config.PipelineConfig` is in one class,
listed in :data:`KEY_CLASSES` (a test checks that every key of the schema is there):

* **free to change** (:attr:`KeyClass.FREE`): where the experiment lives, the horizon,
  validation, logging, checkpointing and retention. They change when and what is
  measured or kept, not what is trained; a resume applies them. Validation's keys
  (:data:`VALIDATION_KEYS`) change the run when a scheduler follows validation metrics
  (a plateau scheduler): :func:`steering_keys` says which free keys steer a config.
* **changes the run** (:attr:`KeyClass.RUN`): anything that trains differently (data,
  batching, loss, optimizer, schedules, accumulation, clipping, seed, precision). A
  resume that changes one is refused, with each changed key and its old and new value.
  A *fork* (``fork: true``, ``baton run --fork``) applies them on purpose: it continues
  from the checkpoint's weights, position and RNG states as the new config would have
  it at that point, and every checkpoint it writes records the fork.
* **fixed at the start** (:attr:`KeyClass.START`): the model and the weights the run
  started from. The checkpoint's weights only fit the model they were trained with,
  and ``load_from`` only applies to a fresh start, so these are refused even for a
  fork: start a new experiment instead.

:class:`ResumeCheck` applies this when a pipeline resumes: it sees the checkpoint before
anything is loaded, refuses, or turns the checkpoint into a fork's starting state.

Keys are compared as leaves of the resolved configs (``optim_wrapper.optimizer.lr``,
``param_scheduler.0.milestones``; a component whose ``type`` changed is one change); a
leaf takes the class of the nearest key of the table above it. docs/resume.md explains
the classes to users.

The table and the comparison are in :mod:`baton.run.resume_policy.keys`, the check and the
fork in :mod:`baton.run.resume_policy.fork`; both are imported from here.
"""

from baton.run.resume_policy.fork import ResumeCheck, fast_forward_schedulers
from baton.run.resume_policy.keys import (
    FREE,
    KEY_CLASSES,
    RUN,
    START,
    VALIDATION_KEYS,
    ConfigChange,
    KeyClass,
    classify,
    compare,
    horizon_problem,
    needs_epoch_boundary,
    reads_validation,
    schema_keys,
    steering_keys,
)

__all__ = [
    "FREE",
    "KEY_CLASSES",
    "RUN",
    "START",
    "VALIDATION_KEYS",
    "ConfigChange",
    "KeyClass",
    "ResumeCheck",
    "classify",
    "compare",
    "fast_forward_schedulers",
    "horizon_problem",
    "needs_epoch_boundary",
    "reads_validation",
    "schema_keys",
    "steering_keys",
]
