"""``CheckpointRef``: the small, frozen handle that travels between tasks, and the naming scheme.

A reference says where a checkpoint is and what it must contain (size, sha256); it never
holds tensors. ``CheckpointName`` is the one place that formats, parses and orders the
file names of an experiment's checkpoints, including the lineage prefix that keeps two
lineages of one experiment from ever writing the same file.
"""

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class CheckpointRef(BaseModel):
    """Where a committed checkpoint lives and how to recognise it intact.

    Attributes:
        uri: Local path or fsspec URI of the file.
        epoch: Completed epochs when it was written.
        iter: Completed training iterations when it was written.
        size: File size in bytes.
        sha256: Hex digest of the file's bytes.
        metrics: Metrics known when it was written (validation accuracy, loss...).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    epoch: int = Field(ge=0)
    iter: int = Field(ge=0)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metrics: dict[str, float] = Field(default_factory=dict)

    def to_json(self) -> str:
        """Serialise to a JSON string (the inverse of :meth:`from_json`)."""
        return self.model_dump_json()

    @classmethod
    def of_file(cls, uri: str) -> "CheckpointRef":
        """A reference to a checkpoint no manifest records (a file named by a run or an
        operator): its size and sha256 pin the bytes; its position is read on load."""
        from baton.checkpoint import io  # torch and fsspec: only when a file is hashed

        size, digest = io.sha256_of(uri)
        return cls(uri=uri, epoch=0, iter=0, size=size, sha256=digest)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointRef":
        """Parse a reference written by :meth:`to_json`."""
        return cls.model_validate_json(text)


_LINEAGE_RE = re.compile(r"^L(?P<lineage>[1-9]\d{0,8})-(?P<rest>.+)$")
_NAME_RE = re.compile(r"^(?P<kind>epoch|iter)_(?P<number>\d+)\.(?P<suffix>pth|dcp)$")


@dataclass(frozen=True, order=True)
class CheckpointName:
    """A checkpoint file name: ``epoch_0003.pth`` or ``iter_000120.pth``; a sharded
    checkpoint (a folder written by many processes, :mod:`baton.checkpoint.sharded`)
    ends in ``.dcp`` instead.

    Files of an experiment's first lineage carry no prefix; a later lineage ``n`` names
    its files ``Ln-epoch_0003.pth``, so that a fresh start or a branch never overwrites
    a file another lineage committed. Ordering is by (kind, number, lineage), which only
    matters for display; the store orders checkpoints by commit.
    """

    kind: str
    number: int
    lineage: int = 1
    sharded: bool = False

    EPOCH_DIGITS = 4
    ITER_DIGITS = 6

    @classmethod
    def for_epoch(cls, epoch: int) -> "CheckpointName":
        """The name of the checkpoint written at the end of ``epoch``."""
        return cls("epoch", epoch)

    @classmethod
    def for_iter(cls, iteration: int) -> "CheckpointName":
        """The name of a checkpoint written after ``iteration`` iterations."""
        return cls("iter", iteration)

    @classmethod
    def parse(cls, name: str) -> "CheckpointName | None":
        """Parse a file name; ``None`` when it does not follow the scheme."""
        lineage, rest = cls.split_lineage(name)
        match = _NAME_RE.fullmatch(rest)
        if match is None:
            return None
        return cls(match["kind"], int(match["number"]), lineage, match["suffix"] == "dcp")

    @staticmethod
    def split_lineage(filename: str) -> tuple[int, str]:
        """``("L3-epoch_0002.pth")`` -> ``(3, "epoch_0002.pth")``; no prefix is lineage 1."""
        match = _LINEAGE_RE.fullmatch(filename)
        if match is None:
            return 1, filename
        return int(match["lineage"]), match["rest"]

    @staticmethod
    def in_lineage(filename: str, lineage: int) -> str:
        """The file name a bare name without a lineage prefix takes in ``lineage``."""
        return filename if lineage == 1 else f"L{lineage}-{filename}"

    def __str__(self) -> str:
        digits = self.EPOCH_DIGITS if self.kind == "epoch" else self.ITER_DIGITS
        suffix = "dcp" if self.sharded else "pth"
        return CheckpointName.in_lineage(
            f"{self.kind}_{self.number:0{digits}d}.{suffix}", self.lineage
        )

    def as_sharded(self) -> "CheckpointName":
        """The same name for a sharded checkpoint (``epoch_0003.dcp``)."""
        return CheckpointName(self.kind, self.number, self.lineage, True)
