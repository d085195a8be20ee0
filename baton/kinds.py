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
