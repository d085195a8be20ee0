"""`baton ckpt diff`: which tensors differ and by how much, metadata differences, streaming."""

import pickle

import pytest
import torch

from baton.checkpoint import compare
from baton.checkpoint.mapped import MappedCheckpoint, diff_files
from baton.flows.cli import main


def checkpoint(**meta) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "meta": {"epoch": 1, "iter": 8, "time": "t0", **meta},
        "state_dict": {
            "fc.weight": torch.randn(4, 3, generator=generator),
            "fc.bias": torch.zeros(4),
            "steps": torch.tensor(5),
            "mask": torch.tensor([True, False]),
        },
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(4, 3)}}, "param_groups": []},
        "param_schedulers": [{"last_epoch": 1}],
    }


def test_identical_files(tmp_path, capsys):
    torch.save(checkpoint(), tmp_path / "a.pth")
    torch.save(checkpoint(), tmp_path / "b.pth")
    assert main(["ckpt", "diff", str(tmp_path / "a.pth"), str(tmp_path / "b.pth")]) == 0
    assert "identical" in capsys.readouterr().out


def test_differences_are_named_with_their_size(tmp_path, capsys):
    a, b = checkpoint(), checkpoint(epoch=2, time="t1")
    b["state_dict"]["fc.weight"][1, 2] += 0.25
    b["state_dict"]["fc.bias"] = torch.zeros(5)
    b["state_dict"]["mask"][1] = True
    b["optimizer"]["state"][0]["momentum_buffer"] = torch.ones(4, 3, dtype=torch.float64)
    del b["param_schedulers"]
    b["extra"] = 1
    torch.save(a, tmp_path / "a.pth")
    torch.save(b, tmp_path / "b.pth")
    code = main(["ckpt", "diff", str(tmp_path / "a.pth"), str(tmp_path / "b.pth")])
    out = capsys.readouterr().out
    assert code == 1
    expected = abs(0.25 / float(b["state_dict"]["fc.weight"][1, 2]))
    assert (
        f"state_dict.fc.weight: 1 of 12 elements differ, max abs 0.25, max rel {expected:.6g}"
        in out
    )
    assert "state_dict.fc.bias: shape ((4,) vs (5,))" in out
    assert "state_dict.mask: 1 of 2 elements differ" in out
    assert "optimizer.state.0.momentum_buffer: dtype (torch.float32 vs torch.float64)" in out
    assert "meta.epoch: value (1 vs 2)" in out and "meta.time: value ('t0' vs 't1')" in out
    assert "param_schedulers.0.last_epoch: only in A" in out and "extra: only in B" in out
    assert "state_dict.steps" not in out


def test_ignore_and_limit(tmp_path, capsys):
    torch.save(checkpoint(), tmp_path / "a.pth")
    torch.save(checkpoint(epoch=3, time="t1"), tmp_path / "b.pth")
    paths = [str(tmp_path / "a.pth"), str(tmp_path / "b.pth")]
    assert main(["ckpt", "diff", *paths, "--ignore", "meta.time"]) == 1
    assert "meta.time" not in capsys.readouterr().out
    assert main(["ckpt", "diff", *paths, "--ignore", "meta"]) == 0
    capsys.readouterr()
    assert main(["ckpt", "diff", *paths, "--limit", "1"]) == 1
    assert "... and 1 more" in capsys.readouterr().out


def test_bits_not_values_are_compared():
    a = torch.tensor([0.0, float("nan"), 1.0])
    assert compare.compare_tensors("x", a, a.clone()) is None  # the same NaN is equal
    found = compare.compare_tensors("x", a, torch.tensor([-0.0, float("nan"), 1.0]))
    assert (found.count, found.max_abs) == (1, 0.0)  # -0.0 is not 0.0, bit for bit
    nan = compare.compare_tensors("x", a, torch.tensor([0.0, 2.0, 1.0]))
    assert nan.max_abs == float("inf")
    zero = compare.compare_tensors("x", torch.tensor([1.0]), torch.tensor([0.0]))
    assert (zero.max_abs, zero.max_rel) == (1.0, float("inf"))


def test_big_tensors_are_compared_in_chunks_and_released():
    a, b = torch.arange(10, dtype=torch.float32), torch.arange(10, dtype=torch.float32)
    b[7] = 0.5
    released = []
    found = compare.compare_tensors(
        "x", a, b, release_a=released.append, release_b=released.append, chunk=4
    )
    assert [t.numel() for t in released] == [4, 4, 4, 4, 2, 2]
    assert (found.count, found.max_abs) == (1, 6.5)


def test_a_mapped_checkpoint_gives_its_pages_back(tmp_path):
    torch.save({"w": torch.randn(1 << 20)}, tmp_path / "a.pth")
    mapped = MappedCheckpoint(str(tmp_path / "a.pth"))
    assert mapped.mapped  # Linux: the file is mapped and its pages can be released
    weights = dict(mapped.entries())["w"]
    expected = weights.clone()
    mapped.release(weights)
    assert torch.equal(weights, expected)  # read again from the file
    mapped.release(torch.ones(1 << 16))  # not the file's memory: left alone
    assert not list(diff_files(str(tmp_path / "a.pth"), str(tmp_path / "a.pth")))


def test_a_legacy_file_is_compared_whole(tmp_path):
    torch.save(checkpoint(), tmp_path / "a.pth", _use_new_zipfile_serialization=False)
    torch.save(checkpoint(epoch=2), tmp_path / "b.pth")
    assert not MappedCheckpoint(str(tmp_path / "a.pth")).mapped
    found = [str(d) for d in diff_files(str(tmp_path / "a.pth"), str(tmp_path / "b.pth"))]
    assert found == ["meta.epoch: value (1 vs 2)"]


@pytest.mark.parametrize("bad", ["missing", "text", "pickle"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, bad):
    torch.save(checkpoint(), tmp_path / "a.pth")
    other = tmp_path / "b.pth"
    if bad == "text":
        other.write_text("hello\n")
    elif bad == "pickle":

        class Evil:
            def __reduce__(self):
                return (print, ("ran",))

        other.write_bytes(pickle.dumps({"meta": Evil()}, protocol=2))
    assert main(["ckpt", "diff", str(tmp_path / "a.pth"), str(other)]) == 2
    captured = capsys.readouterr()
    assert "ran" not in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("baton: ")
