"""Two checkpoints compared entry by entry: which tensors differ, by how much, and which
other values (position, metrics, metadata) differ.

A checkpoint is seen as its *entries*: ``(name, value)`` pairs, one per tensor or plain
value, named by their path (``state_dict.fc1.weight``, ``optimizer.state.0.exp_avg``,
``meta.rng.torch``). :func:`entries` gives them for a checkpoint dict; any other reader
(a sharded checkpoint's, one shard at a time) only has to yield the same pairs, and
:func:`diff` compares them. Tensors are compared bit for bit (``-0.0`` and ``0.0``
differ, a NaN equals the same NaN) in chunks, each chunk handed to a ``release``
callback once compared, so that a memory-mapped file's pages can be given back as the
comparison goes (:mod:`baton.checkpoint.mapped`): memory stays about one chunk per side.
"""

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from baton.errors import short_repr

# Elements compared at a time: 4 Mi elements, 16 MiB of float32 per side, and twice that
# for the float64 copies of the elements that differ.
CHUNK_ELEMENTS = 1 << 22

# Same-width integer types to compare elements' bits.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

Entries = Iterable[tuple[str, Any]]
Release = Callable[[torch.Tensor], None]


def entries(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The entries of a (nested) checkpoint value: tensors and plain values by path.

    Dicts are entered key by key (in their order), lists and tuples item by item; an
    empty container is an entry of its own, so that ``{}`` and a missing key differ.
    """
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from entries(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, (list, tuple)) and value:
        for index, item in enumerate(value):
            yield from entries(item, f"{prefix}.{index}" if prefix else str(index))
    else:
        yield prefix, value


@dataclass(frozen=True)
class Difference:
    """One entry that differs between checkpoints A and B.

    Attributes:
        name: The entry's path.
        kind: ``only in A``, ``only in B``, ``type``, ``dtype``, ``shape``, ``values``
            (a tensor's elements) or ``value`` (a plain value).
        detail: What A and B hold, for the kinds other than ``values``.
        count: Elements that differ (``values``), of ``numel``.
        max_abs: Largest absolute difference of the elements that differ (``inf`` where
            one side is NaN or infinite and the other not).
        max_rel: Largest ``|a - b| / |b|`` of the elements that differ (``inf`` where
            ``b`` is 0).
    """

    name: str
    kind: str
    detail: str = ""
    count: int = 0
    numel: int = 0
    max_abs: float | None = None
    max_rel: float | None = None

    def __str__(self) -> str:
        if self.kind != "values":
            return f"{self.name}: {self.kind}{f' ({self.detail})' if self.detail else ''}"
        size = f"{self.count} of {self.numel} elements differ"
        if self.max_abs is None:
            return f"{self.name}: {size}"
        return f"{self.name}: {size}, max abs {self.max_abs:.6g}, max rel {self.max_rel:.6g}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    return short_repr(value)


def _bits(flat: torch.Tensor) -> torch.Tensor:
    """The elements' bits as integers of the same width (complex: two per element)."""
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    return flat.view(_BITS[flat.element_size()])


def compare_tensors(
    name: str,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    release_a: Release | None = None,
    release_b: Release | None = None,
    chunk: int = CHUNK_ELEMENTS,
) -> Difference | None:
    """``None`` when ``a`` and ``b`` are bitwise equal; else what differs.

    Compared ``chunk`` elements at a time, each chunk released once compared.
    """
    if a.dtype != b.dtype:
        return Difference(name, "dtype", f"{a.dtype} vs {b.dtype}")
    if a.shape != b.shape:
        return Difference(name, "shape", f"{tuple(a.shape)} vs {tuple(b.shape)}")
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)  # views of the stored, contiguous tensors
    count, max_abs, max_rel = 0, 0.0, 0.0
    numeric = a.dtype != torch.bool
    for start in range(0, flat_a.numel(), chunk):
        part_a, part_b = flat_a[start : start + chunk], flat_b[start : start + chunk]
        differs = _bits(part_a) != _bits(part_b)
        if part_a.is_complex():
            differs = differs.view(-1, 2).any(dim=1)
        found = int(differs.sum())
        if found:
            count += found
            if numeric:
                abs_diff, rel_diff = _distances(part_a[differs], part_b[differs])
                max_abs, max_rel = max(max_abs, abs_diff), max(max_rel, rel_diff)
        for release, part in ((release_a, part_a), (release_b, part_b)):
            if release is not None:
                release(part)
    if not count:
        return None
    return Difference(
        name,
        "values",
        count=count,
        numel=flat_a.numel(),
        max_abs=max_abs if numeric else None,
        max_rel=max_rel if numeric else None,
    )


def _distances(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest absolute and relative difference of elements known to differ."""
    wide = torch.complex128 if a.is_complex() else torch.float64
    a, b = a.to(wide), b.to(wide)
    abs_diff = (a - b).abs()
    # A NaN against a number, or infinities that differ, are infinitely far apart; a
    # NaN against a NaN of other bits, or -0.0 against 0.0, are 0 apart but still differ.
    abs_diff = torch.where(abs_diff.isnan() & ~(a.isnan() & b.isnan()), math.inf, abs_diff)
    abs_diff = torch.nan_to_num(abs_diff, nan=0.0, posinf=math.inf)
    rel_diff = torch.where(b.abs() > 0, abs_diff / b.abs(), math.inf * (abs_diff > 0))
    rel_diff = torch.nan_to_num(rel_diff, nan=0.0, posinf=math.inf)
    return float(abs_diff.max()), float(rel_diff.max())


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def diff(
    a: Entries,
    b: Entries,
    *,
    ignore: tuple[str, ...] = (),
    release_a: Release | None = None,
    release_b: Release | None = None,
) -> Iterator[Difference]:
    """The entries that differ between A and B, in A's order, then those only in B.

    Args:
        a, b: Each checkpoint's entries (:func:`entries`, or a reader's own). Only the
            entries' names and values are held; a memory-mapped tensor is read when
            compared.
        ignore: Names, or prefixes of names (``meta.time``), not compared.
        release_a, release_b: Called with each compared part of a tensor (see
            :func:`compare_tensors`).
    """

    def kept(name: str) -> bool:
        return not any(name == p or name.startswith(p + ".") for p in ignore)

    theirs = {name: value for name, value in b if kept(name)}
    for name, value in a:
        if not kept(name):
            continue
        if name not in theirs:
            yield Difference(name, "only in A", _describe(value))
            continue
        other = theirs.pop(name)
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
            found = compare_tensors(name, value, other, release_a=release_a, release_b=release_b)
            if found is not None:
                yield found
        elif isinstance(value, torch.Tensor) or isinstance(other, torch.Tensor):
            yield Difference(name, "type", f"{_describe(value)} vs {_describe(other)}")
        elif not _same_value(value, other):
            yield Difference(name, "value", f"{_describe(value)} vs {_describe(other)}")
    for name, value in theirs.items():
        yield Difference(name, "only in B", _describe(value))
