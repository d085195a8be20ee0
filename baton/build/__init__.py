"""The registry: where a config's ``type:`` becomes an object, and the only place.

Owns the component kinds and what each slot accepts, the resolution of short names and
dotted paths under the operator's module allowances, the check of a component's
arguments against its signature (``args.py``), and building (``registry.py``): "valid"
means "will build" because checking and building walk the same table. It knows the
components baton ships (``models``, ``data``, ``optim``) and reads ``trust``; it must not
import the engine, the config or the run packages: the strategy, the config checks and the
pipeline build through it.
"""

from baton.build.args import EXTERNAL_SLOTS, Problem
from baton.build.registry import (
    KINDS,
    SUPPLIED,
    Kind,
    build,
    build_scheduler,
    check,
    register,
    resolve,
)

__all__ = [
    "EXTERNAL_SLOTS",
    "KINDS",
    "SUPPLIED",
    "Kind",
    "Problem",
    "build",
    "build_scheduler",
    "check",
    "register",
    "resolve",
]
