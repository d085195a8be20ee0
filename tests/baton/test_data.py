"""Deterministic, resumable data order and the shipped datasets."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from baton.data import (
    DigitsDataset,
    ResumableLoader,
    SyntheticClassification,
    TensorPairDataset,
)
from baton.data.loader import _SeededSamples


def test_epoch_order_is_a_function_of_seed_and_epoch():
    data = SyntheticClassification(num_samples=50)
    a = ResumableLoader(data, 8, seed=1)
    b = ResumableLoader(data, 8, seed=1)
    assert torch.equal(a.epoch_order(3), b.epoch_order(3))
    assert not torch.equal(a.epoch_order(3), a.epoch_order(4))
    assert not torch.equal(a.epoch_order(3), ResumableLoader(data, 8, seed=2).epoch_order(3))
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(a.epoch_order(3), b.epoch_order(3))


def test_starting_inside_an_epoch_yields_the_same_batches():
    data = SyntheticClassification(num_samples=50)
    loader = ResumableLoader(data, 8, seed=5)
    full = list(loader.iter_epoch(2))
    tail = list(loader.iter_epoch(2, start=4))
    assert len(full) == 7 and len(tail) == 3
    for x, y in zip(full[4:], tail, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])


def test_generic_dataset_path_matches_tensor_path():
    data = SyntheticClassification(num_samples=20)

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return data[i]

    fast = list(ResumableLoader(data, 6, seed=0).iter_epoch(1))
    slow = list(ResumableLoader(Plain(), 6, seed=0).iter_epoch(1))
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class _Shifted(SyntheticClassification):
    """A tensor dataset that augments in ``__getitem__``: what it says is what must train."""

    def __getitem__(self, index):
        inputs, target = super().__getitem__(index)
        return inputs + 1.0, target


class _Flattened(TensorPairDataset):
    """A tensor dataset whose samples are not its tensors' rows."""

    def __getitem__(self, index):
        inputs, target = super().__getitem__(index)
        return inputs.flatten(), target


def test_a_tensor_dataset_that_overrides_getitem_trains_on_what_getitem_returns():
    data = _Shifted(num_samples=20)
    inputs, targets = data.tensors
    loader = ResumableLoader(data, 6, seed=0)
    batches = list(loader.iter_epoch(1))
    for index, (x, y) in zip(loader.batch_indices(1), batches, strict=True):
        assert torch.equal(x, inputs[index] + 1.0) and torch.equal(y, targets[index])
    resumed = list(loader.iter_epoch(1, start=2))
    for a, b in zip(batches[2:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    (meta_inputs, _) = ResumableLoader(
        _Flattened(torch.zeros(5, 2, 3), torch.zeros(5)), 4
    ).meta_batch()
    assert meta_inputs.shape == (4, 6)


@pytest.mark.parametrize(
    "data",
    [
        SyntheticClassification(num_samples=20),
        DigitsDataset("val"),
        torch.utils.data.TensorDataset(torch.randn(20, 3), torch.arange(20)),
    ],
    ids=["SyntheticClassification", "DigitsDataset", "TensorDataset"],
)
def test_plain_tensor_datasets_are_sliced_without_reading_samples(data, monkeypatch):
    def no_reads(self, keys):
        raise AssertionError("a plain tensor dataset was read sample by sample")

    monkeypatch.setattr(_SeededSamples, "__getitems__", no_reads)
    loader = ResumableLoader(data, 6, seed=0)
    for index, batch in zip(loader.batch_indices(0), loader.iter_epoch(0), strict=True):
        assert all(torch.equal(b, t[index]) for b, t in zip(batch, data.tensors, strict=True))
    assert [t.shape[1:] for t in loader.meta_batch()] == [t.shape[1:] for t in data.tensors]


def test_drop_last_and_no_shuffle():
    data = SyntheticClassification(num_samples=10)
    assert len(ResumableLoader(data, 4, drop_last=True)) == 2
    assert len(ResumableLoader(data, 4)) == 3
    assert torch.equal(ResumableLoader(data, 4, shuffle=False).epoch_order(7), torch.arange(10))


def test_a_meta_batch_has_the_first_batchs_structure_and_shapes_and_moves_no_rng():
    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            noise = torch.rand(())  # a random augmentation, seeded per sample
            return {"image": torch.full((1, 4, 4), float(i)) + noise, "tags": (i, "x")}, i

    loader = ResumableLoader(Samples(), 4, seed=0)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    (inputs, targets) = loader.meta_batch()
    assert torch.equal(torch.get_rng_state(), before)
    assert inputs["image"].device.type == "meta" and inputs["image"].shape == (4, 1, 4, 4)
    assert inputs["tags"][0].shape == (4,)  # strings stay as the collate left them
    assert targets.shape == (4,) and targets.dtype == torch.int64
    tensors = ResumableLoader(SyntheticClassification(num_samples=3), 8).meta_batch()
    assert [(t.device.type, t.shape) for t in tensors] == [("meta", (3, 8)), ("meta", (3,))]


def test_bad_start():
    loader = ResumableLoader(SyntheticClassification(num_samples=10), 4)
    with pytest.raises(ValueError, match="start must be between 0 and 3"):
        list(loader.iter_epoch(0, start=9))


def test_digits_split_is_fixed_and_disjoint():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert len(train) + len(val) == 1797 and len(val) == 359
    assert torch.equal(DigitsDataset("val").tensors[0], val.tensors[0])
    assert DigitsDataset("train", image=True).tensors[0].shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        DigitsDataset("test")


def test_digits_read_directly_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits

    from baton.data import load_digits_arrays

    data, target = load_digits_arrays()
    expected_data, expected_target = load_digits(return_X_y=True)
    assert np.array_equal(data, expected_data) and data.dtype == expected_data.dtype
    assert np.array_equal(target, expected_target)


LOADER_LEFT_OPEN = """
import torch
from baton.data import ResumableLoader

class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.tensor([float(i * i)])

loader = ResumableLoader(Squares(), 4, num_workers=2)
print(sum(len(batch) for batch in loader.iter_epoch(0)))
"""


def test_a_process_that_ends_with_its_loader_open_exits():
    # Workers ignore SIGTERM, which is how multiprocessing stops them at exit: without the
    # loader's own exit handler, this process waited for its workers forever.
    done = subprocess.run(
        [sys.executable, "-c", LOADER_LEFT_OPEN], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "8", done.stderr[-2000:]
