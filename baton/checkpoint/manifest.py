"""The manifest's format: a snapshot, a journal of changes since, and the first format.

``manifest.json`` is a snapshot (format 2)::

    {"version": 2, "generation": 3, "next_seq": 57,
     "lineages": [{"id": 1, "started": ..., "reason": "first", "parent": null, ...}],
     "checkpoints": [{"seq": 12, "path": "checkpoints/epoch_0003.pth", "lineage": 1,
                      "epoch": 3, "iter": 135, "size": ..., "sha256": ...,
                      "metrics": {"val/accuracy": 0.97, "val/loss": null}, "created": ...}],
     "outside": [{"seq": 4, "what": "/etc/passwd", "problem": "an absolute path..."}]}

A lineage started by a run records the run's resolved config (``"config"``), which
auto-resume compares with the next run's (:func:`baton.run.control.find_resume_point`).

``manifest.journal`` starts with a header line naming the snapshot generation it
follows, then one line per change: ``<crc32 of the JSON, 8 hex digits> <JSON>``, where
the JSON is ``{"op": "lineage", "lineage": {...}}`` or ``{"op": "commit", "entry": {...},
"drop": [seq, ...]}`` (the entry, and the entries rotation removed, in one record). A
line without its newline or with a checksum that does not match is a torn write and is
ignored; a journal whose generation is older than the snapshot's was folded into it.

The first format (before lineages) was one JSON file of entries with absolute ``uri``s;
:func:`read_first_format` reads it. Paths in format 2 are relative to the experiment
folder, and only ``checkpoints/<name>`` is one of the experiment's own files: anything
else is kept as an ``outside`` entry, reported and never followed.

This module only reads and encodes; :mod:`baton.checkpoint.committed` writes.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zlib
from pathlib import Path, PurePosixPath

from baton.checkpoint import io
from baton.checkpoint.ref import CheckpointRef
from baton.errors import CheckpointCorruptError, CheckpointOutsideError, ManifestVersionError

MANIFEST_VERSION = 2
# The journal is folded into the snapshot once it holds this many records, or as many as
# the snapshot has entries if that is more: compaction then costs O(1) per commit on
# average, however long the history.
COMPACT_AFTER = 1024
# A manifest or journal larger than this is not read (a hostile file must not exhaust
# memory); 10,000 entries take about 4 MB.
MAX_MANIFEST_BYTES = 512 << 20
CHECKPOINTS = "checkpoints"


def finite(value) -> bool:
    """True for a number that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def clean_metrics(metrics: dict | None) -> dict[str, float | None]:
    """Metrics as the manifest stores them: NaN and infinities become ``null``, so that
    the manifest stays valid JSON and such a value is never ranked as best."""
    return {str(k): (float(v) if finite(float(v)) else None) for k, v in (metrics or {}).items()}


def path_problem(path) -> str | None:
    """Why a manifest path is not one of the store's own files (``None``: it is)."""
    if not isinstance(path, str) or "\0" in path or "\\" in path:
        return "not a path"
    pure = PurePosixPath(path)
    if pure.is_absolute():
        return "an absolute path; the store only uses files inside its checkpoints/ folder"
    if ".." in pure.parts:
        return "a path with '..'; the store only uses files inside its checkpoints/ folder"
    if len(pure.parts) != 2 or pure.parts[0] != CHECKPOINTS:
        return "not a file directly inside checkpoints/"
    return None


def encode_record(record: dict) -> bytes:
    """One journal line: the crc32 of the JSON, a space, the JSON, a newline."""
    body = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return f"{zlib.crc32(body.encode()):08x} {body}\n".encode()


def decode_record(line: bytes) -> dict | None:
    """A journal line's record, or ``None`` if the line is torn or damaged."""
    try:
        crc, body = line.decode("utf-8").split(" ", 1)
        if int(crc, 16) != zlib.crc32(body.encode()):
            return None
        record = json.loads(body)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def parse_journal(data: bytes) -> tuple[list[dict], int, str | None]:
    """Records of complete, intact journal lines; the offset after the last of them; and
    a problem when a damaged line is followed by intact ones (only a torn tail is normal)."""
    records: list[dict] = []
    offset = 0
    damaged_at = None
    *complete, _tail = data.split(b"\n")  # the tail (after the last newline) is torn
    for number, line in enumerate(complete, 1):
        record = decode_record(line)
        if record is None:
            damaged_at = damaged_at or number
            continue
        if damaged_at is not None:
            return records, offset, f"the journal is damaged at line {damaged_at}"
        records.append(record)
        offset += len(line) + 1
    return records, offset, None


class ManifestState:
    """The committed state: lineages and entries, in commit order."""

    def __init__(self) -> None:
        self.generation = 0
        self.next_seq = 1
        self.lineages: dict[int, dict] = {}
        self.entries: dict[int, dict] = {}  # seq -> entry, in commit order
        self.by_path: dict[str, int] = {}
        # lineage -> its entries' seqs, in commit order: rotation looks at its lineage's
        # kept entries only, so a commit's cost does not grow with the other lineages
        self.by_lineage: dict[int, dict[int, None]] = {}
        self.outside: list[dict] = []
        self.records = 0
        self.problem: str | None = None  # the files on disk could not be read as they are
        self.pending: str | None = None  # a repair for the next writer

    @property
    def head(self) -> int | None:
        return max(self.lineages, default=None)

    @property
    def key(self) -> tuple[int, int]:
        return (self.generation, self.records)

    def add_lineage(self, raw: dict) -> None:
        lineage_id = int(raw["id"])
        if lineage_id < 1:
            raise ValueError(f"lineage id {lineage_id} is not positive")
        parent = raw.get("parent")
        if parent is not None and not isinstance(parent, dict):
            raise TypeError("a lineage's parent is not an object")
        self.lineages[lineage_id] = {
            "id": lineage_id,
            "started": float(raw.get("started", 0.0)),
            "reason": str(raw.get("reason", "")),
            "parent": parent,
            "run": raw.get("run"),
            "config_hash": raw.get("config_hash"),
        }
        if isinstance(raw.get("config"), dict):
            self.lineages[lineage_id]["config"] = raw["config"]

    def add_entry(self, raw: dict) -> None:
        """Take an entry as recorded; one that points outside goes to ``outside``."""
        seq = int(raw["seq"])
        problem = path_problem(raw.get("path"))
        if problem is not None:
            self.outside.append({"seq": seq, "what": str(raw.get("path")), "problem": problem})
            self.next_seq = max(self.next_seq, seq + 1)
            return
        path = str(PurePosixPath(raw["path"]))
        entry = {
            "seq": seq,
            "path": path,
            "lineage": int(raw["lineage"]),
            "epoch": int(raw["epoch"]),
            "iter": int(raw["iter"]),
            "size": int(raw["size"]),
            "sha256": str(raw["sha256"]),
            "metrics": {
                str(k): (None if v is None else float(v))
                for k, v in (raw.get("metrics") or {}).items()
            },
            "created": float(raw.get("created", 0.0)),
        }
        entry_ref(entry, Path("/"))  # checks the types and ranges, as a reference would
        replaced = self.by_path.pop(path, None)
        if replaced is not None:
            self._forget(replaced)
        self.entries[seq] = entry
        self.by_path[path] = seq
        self.by_lineage.setdefault(entry["lineage"], {})[seq] = None
        self.next_seq = max(self.next_seq, seq + 1)

    def drop(self, seq: int) -> dict | None:
        entry = self._forget(seq)
        if entry is not None and self.by_path.get(entry["path"]) == seq:
            del self.by_path[entry["path"]]
        return entry

    def _forget(self, seq: int) -> dict | None:
        entry = self.entries.pop(seq, None)
        if entry is not None:
            self.by_lineage.get(entry["lineage"], {}).pop(seq, None)
        return entry

    def lineage_entries(self, lineage: int) -> list[dict]:
        """The entries of ``lineage``, in commit order (without a scan of the others)."""
        return [self.entries[seq] for seq in self.by_lineage.get(lineage, ())]

    def apply(self, record: dict) -> None:
        op = record.get("op")
        if op == "lineage":
            self.add_lineage(record["lineage"])
        elif op == "commit":
            self.add_entry(record["entry"])
            for seq in record.get("drop", []):
                self.drop(int(seq))
        else:
            raise ValueError(f"unknown journal record {op!r}")
        self.records += 1

    def parent_seqs(self) -> set[int]:
        return {
            int(lin["parent"]["seq"])
            for lin in self.lineages.values()
            if lin["parent"] and "seq" in lin["parent"]
        }

    def snapshot(self) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "generation": self.generation,
            "next_seq": self.next_seq,
            "lineages": [self.lineages[k] for k in sorted(self.lineages)],
            "checkpoints": list(self.entries.values()),
            "outside": self.outside,
        }


def entry_ref(entry: dict, checkpoint_dir: Path) -> CheckpointRef:
    return CheckpointRef(
        uri=str(checkpoint_dir / PurePosixPath(entry["path"]).name),
        epoch=entry["epoch"],
        iter=entry["iter"],
        size=entry["size"],
        sha256=entry["sha256"],
        metrics={k: (math.nan if v is None else v) for k, v in entry["metrics"].items()},
    )


def read_snapshot(data) -> ManifestState:
    if not isinstance(data, dict):
        raise TypeError("the manifest is not a JSON object")
    version = data.get("version", 1)
    if version == 1:
        return read_first_format(data)
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ManifestVersionError(
            f"the manifest has format {version!r}, newer than this baton's "
            f"({MANIFEST_VERSION}); upgrade baton to use this experiment (nothing was changed)"
        )
    state = ManifestState()
    state.generation = int(data["generation"])
    state.next_seq = int(data.get("next_seq", 1))
    for raw in data["lineages"]:
        state.add_lineage(raw)
    for raw in data["checkpoints"]:
        state.add_entry(raw)
    for raw in data.get("outside", []):
        state.outside.append(
            {"seq": int(raw["seq"]), "what": str(raw["what"]), "problem": str(raw["problem"])}
        )
    return state


def read_first_format(data: dict) -> ManifestState:
    """Read a manifest of the first format: absolute URIs, no lineages.

    An entry whose file is named ``checkpoints/<name>`` is taken as this experiment's
    ``checkpoints/<name>``: that is where the first format wrote every committed file, and
    it is what a moved or copied experiment holds (the recorded absolute path may be the
    original's). Anything else is kept as an outside entry, reported and never followed.
    """
    entries = data["checkpoints"]
    if not isinstance(entries, list):
        raise TypeError("'checkpoints' is not a list")
    state = ManifestState()
    state.pending = "migrate"
    state.add_lineage({"id": 1, "started": 0.0, "reason": "migrated", "parent": None})
    for raw in sorted(entries, key=lambda e: int(e["seq"])):
        uri = raw["uri"]
        if not isinstance(uri, str):
            raise TypeError("an entry's 'uri' is not a string")
        candidate = PurePosixPath(uri[len("file://") :] if uri.startswith("file://") else uri)
        own = (
            io.is_local(uri)
            and candidate.parent.name == CHECKPOINTS
            and candidate.name not in ("", ".", "..")
        )
        state.add_entry(
            {
                **raw,
                "path": f"{CHECKPOINTS}/{candidate.name}" if own else uri,
                "lineage": 1,
            }
        )
    return state


# files read and appended without following links ------------------------------------------------


def stat_key(path: Path) -> tuple | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_regular_file(path: Path, offset: int = 0) -> bytes:
    """The bytes of a regular file (not a link, not a device) from ``offset``."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointOutsideError(f"{path} is not a regular file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise CheckpointCorruptError(f"{path} has {st.st_size} bytes, more than any manifest")
        os.lseek(fd, offset, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def append_record(fd: int, line: bytes) -> None:
    """Append one journal line and make it durable (the commit point of a commit)."""
    view = memoryview(line)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)
