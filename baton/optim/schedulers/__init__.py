"""Parameter schedulers with mmengine's names, arguments and semantics.

Each scheduler updates one hyper-parameter (``lr`` for the ``*LR`` classes) of every
param group, in mmengine's chainable form, inside ``[begin, end)`` measured in epochs
(``by_epoch=True``) or iterations. ``convert_to_iter_based=True`` in a config turns an
epoch-based schedule into the same curve stepped every iteration. For the same config,
the value at every step equals mmengine's (a test compares them step by step), and the
state dicts use mmengine's attribute names, so checkpoints resume in either library.

Errors and warnings are mmengine's too: the same exception types, each message starting
with mmengine's words (code and tests that match them keep working) and going on to say
what to do. Building a scheduler wraps ``optimizer.step`` with a counter, as mmengine
does, so that stepping a scheduler before the optimizer's first step warns.
``docs/mmengine.md`` lists the few deliberate differences.

The package's modules: :mod:`~baton.optim.schedulers.base` (the base class and its checks),
:mod:`~baton.optim.schedulers.param` (the ``*ParamScheduler`` schedules),
:mod:`~baton.optim.schedulers.plateau` (``ReduceOnPlateau``); the ``*LR`` classes and the
:data:`SCHEDULERS` table that configs name them by are here.
"""

# Every name the single module offered stays importable from here, private helpers
# included (baton.build and baton.engine use _ParamScheduler): see __all__ below.
from baton.optim.schedulers.base import (
    INF,
    _check_convertible,
    _check_optimizer,
    _check_range,
    _ParamScheduler,
    _record_initial_values,
    _warn_step_order,
    _with_counter,
    logger,
)
from baton.optim.schedulers.param import (
    ConstantParamScheduler,
    CosineAnnealingParamScheduler,
    CosineRestartParamScheduler,
    ExponentialParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    OneCycleParamScheduler,
    PolyParamScheduler,
    StepParamScheduler,
)
from baton.optim.schedulers.plateau import ReduceOnPlateauParamScheduler


def _lr_variant(base: type) -> type:
    """The ``*LR`` class of a param scheduler: the same schedule applied to ``lr``."""

    def __init__(self, optimizer, *args, **kwargs):
        base.__init__(self, optimizer, "lr", *args, **kwargs)

    name = base.__name__.replace("ParamScheduler", "LR")
    doc = f"{base.__doc__} Applied to the learning rate (mmengine's ``{name}``)."
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


StepLR = _lr_variant(StepParamScheduler)
MultiStepLR = _lr_variant(MultiStepParamScheduler)
ConstantLR = _lr_variant(ConstantParamScheduler)
ExponentialLR = _lr_variant(ExponentialParamScheduler)
CosineAnnealingLR = _lr_variant(CosineAnnealingParamScheduler)
LinearLR = _lr_variant(LinearParamScheduler)
PolyLR = _lr_variant(PolyParamScheduler)
OneCycleLR = _lr_variant(OneCycleParamScheduler)
CosineRestartLR = _lr_variant(CosineRestartParamScheduler)
ReduceOnPlateauLR = _lr_variant(ReduceOnPlateauParamScheduler)

SCHEDULERS: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        StepParamScheduler,
        MultiStepParamScheduler,
        ConstantParamScheduler,
        ExponentialParamScheduler,
        CosineAnnealingParamScheduler,
        LinearParamScheduler,
        PolyParamScheduler,
        OneCycleParamScheduler,
        CosineRestartParamScheduler,
        ReduceOnPlateauParamScheduler,
        StepLR,
        MultiStepLR,
        ConstantLR,
        ExponentialLR,
        CosineAnnealingLR,
        LinearLR,
        PolyLR,
        OneCycleLR,
        CosineRestartLR,
        ReduceOnPlateauLR,
    )
}

__all__ = [
    "INF",
    "SCHEDULERS",
    "ConstantLR",
    "ConstantParamScheduler",
    "CosineAnnealingLR",
    "CosineAnnealingParamScheduler",
    "CosineRestartLR",
    "CosineRestartParamScheduler",
    "ExponentialLR",
    "ExponentialParamScheduler",
    "LinearLR",
    "LinearParamScheduler",
    "MultiStepLR",
    "MultiStepParamScheduler",
    "OneCycleLR",
    "OneCycleParamScheduler",
    "PolyLR",
    "PolyParamScheduler",
    "ReduceOnPlateauLR",
    "ReduceOnPlateauParamScheduler",
    "StepLR",
    "StepParamScheduler",
    "_ParamScheduler",
    "_check_convertible",
    "_check_optimizer",
    "_check_range",
    "_record_initial_values",
    "_warn_step_order",
    "_with_counter",
    "logger",
]
