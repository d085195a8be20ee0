"""Markers for where a config may put a component, read by :mod:`baton.build`.

A constructor argument annotated ``Annotated[T, Slot("transform")]`` takes a component
(a ``{type: ..., ...}`` mapping) of that kind; ``Slot("transform", many=True)`` takes a
list of them. Everywhere else a mapping with a ``type`` key is plain data, and the
config is refused: components are built only where the schema says one goes.

This module imports nothing heavy, so datasets, models and a user's own code can
declare slots without importing the registry.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """An argument that takes a component of ``kind`` (a list of them with ``many``)."""

    kind: str
    many: bool = False


@dataclass(frozen=True)
class DataPath:
    """An argument naming a file or folder a dataset reads (``Annotated[str, DataPath()]``).

    It must lie inside the project or an operator's data root (``BATON_DATA_ROOTS``): a
    config from the UI cannot point a dataset at the worker's other files.
    """


class TransformBase:
    """Base of baton's transforms that are not ``nn.Module`` s (``Compose``), so that the
    registry's ``transform`` kind can accept them by what they are."""
