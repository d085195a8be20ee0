"""A checkpoint names no module of baton, so moving baton's modules never breaks one: a
checkpoint written before the engine's modules were grouped into packages resumes exactly.

``fixtures/epoch_0002_baton_0.1.0.pth`` was written by baton 0.1.0 with the flat layout
(``baton/strategy.py``, ``baton/pipeline.py``...): ``small_pipeline`` trained 2 epochs.
"""

import pickletools
import shutil
import zipfile
from pathlib import Path

from baton.checkpoint import io
from baton.config import validate
from baton.run import pipeline as pl

from .helpers import assert_bitwise_equal, flat_state, small_pipeline

FIXTURE = Path(__file__).parent / "fixtures" / "epoch_0002_baton_0.1.0.pth"


def pickled_globals(path: Path) -> set[str]:
    """The ``module name`` of every global a torch checkpoint's pickle refers to."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found = set()
    strings = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        if op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(" ".join(strings[-2:]))
    return found


def config(work_dir: Path, **changes) -> dict:
    data = small_pipeline(work_dir)
    data.update(changes)
    return data


def test_a_checkpoint_names_no_module_of_baton(tmp_path):
    _, ref = pl.run(validate(config(tmp_path / "wd", train={"max_epochs": 1})))
    for path in (Path(io.local_path(ref.uri)), FIXTURE):
        names = pickled_globals(path)
        assert "torch._utils _rebuild_tensor_v2" in names  # the scan sees the globals
        modules = {name.split(" ")[0] for name in names}
        assert modules <= {"torch", "torch._utils", "collections"}, path


def test_a_checkpoint_from_before_the_move_resumes_exactly(tmp_path):
    folder = tmp_path / "wd" / "exp" / "checkpoints"
    folder.mkdir(parents=True)
    old = shutil.copy(FIXTURE, folder / FIXTURE.name)
    resumed, _ = pl.run(validate(config(tmp_path / "wd", train={"max_epochs": 4}, resume=str(old))))
    straight, _ = pl.run(validate(config(tmp_path / "ref", train={"max_epochs": 4})))
    assert resumed.strategy.epoch == 4
    assert_bitwise_equal(flat_state(resumed.strategy), flat_state(straight.strategy))
