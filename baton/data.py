"""Datasets that need no download, and a loader whose order is a function of (seed, epoch).

``ResumableLoader`` makes a run resumable at any iteration: the shuffle of epoch ``e``
depends only on the seed and ``e``, and :meth:`ResumableLoader.iter_epoch` can start at
any batch of the epoch, so a resumed run sees exactly the batches it would have seen.
Tensor datasets are sliced batch by batch (no per-sample Python work).
"""

import functools
import gzip
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import DataLoader, Dataset, default_collate

# Multiplier mixing the seed and the epoch into one generator seed.
_EPOCH_MIX = 1_000_003


class TensorPairDataset(Dataset):
    """Inputs and targets held as two tensors; batches are taken by slicing."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.tensors = (inputs, targets)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index):
        return tuple(t[index] for t in self.tensors)


class DigitsDataset(TensorPairDataset):
    """scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package).

    Args:
        split: ``'train'`` or ``'val'``.
        val_fraction: Share of the images held out for validation.
        split_seed: Seed of the fixed train/val split.
        image: Return ``1x8x8`` images instead of 64-value vectors.
    """

    def __init__(
        self,
        split: Literal["train", "val"] = "train",
        val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2,
        split_seed: Annotated[int, Field(ge=0)] = 0,
        image: bool = False,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
        data, target = load_digits_arrays()
        order = np.random.default_rng(split_seed).permutation(len(target))
        n_val = round(len(order) * val_fraction)
        chosen = order[:n_val] if split == "val" else order[n_val:]
        inputs = torch.tensor(data[chosen] / 16.0, dtype=torch.float32)
        if image:
            inputs = inputs.view(-1, 1, 8, 8)
        super().__init__(inputs, torch.tensor(target[chosen], dtype=torch.long))


@functools.cache
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``(data (1797, 64) float64, target (1797,) int)``, as scikit-learn's
    ``load_digits`` returns them.

    The CSV that scikit-learn ships is read directly: importing ``sklearn.datasets``
    takes most of a second, which every new process (a run, a retried task, a
    deployment's flow run) would pay. Falls back to ``load_digits`` if the file moved.
    """
    spec = importlib.util.find_spec("sklearn")
    roots = spec.submodule_search_locations if spec is not None else None
    for root in roots or []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                table = np.loadtxt(f, delimiter=",")
            return table[:, :-1], table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


class SyntheticClassification(TensorPairDataset):
    """Gaussian blobs, one per class: a tiny dataset for tests.

    Args:
        num_samples: Number of samples.
        num_features: Input size.
        num_classes: Number of classes.
        seed: Seed of the generated data.
    """

    def __init__(
        self,
        num_samples: Annotated[int, Field(ge=1)] = 256,
        num_features: Annotated[int, Field(ge=1)] = 8,
        num_classes: Annotated[int, Field(ge=1)] = 3,
        seed: Annotated[int, Field(ge=0)] = 0,
    ):
        generator = torch.Generator().manual_seed(seed)
        centers = torch.randn(num_classes, num_features, generator=generator) * 2
        targets = torch.randint(num_classes, (num_samples,), generator=generator)
        inputs = centers[targets] + torch.randn(num_samples, num_features, generator=generator)
        super().__init__(inputs, targets)


DATASETS: dict[str, type[Dataset]] = {
    "DigitsDataset": DigitsDataset,
    "SyntheticClassification": SyntheticClassification,
}


class ResumableLoader:
    """Batches of a dataset in an order fixed by ``(seed, epoch)``.

    Args:
        dataset: Any map-style dataset; tensor datasets are sliced directly.
        batch_size: Samples per batch.
        shuffle: Shuffle each epoch (deterministically).
        seed: Seed of the shuffle.
        drop_last: Drop the last, smaller batch.
        num_workers: Worker processes for datasets that are not tensor datasets.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_workers = num_workers

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: a function of (seed, epoch) only."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed((self.seed * _EPOCH_MIX + epoch) % 2**63)
        return torch.randperm(n, generator=generator)

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        """The index tensor of every batch of ``epoch``."""
        order = self.epoch_order(epoch)
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(len(self))]

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator:
        """Yield the batches of ``epoch`` from batch number ``start`` on."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be between 0 and {len(self)}, got {start}")
        batches = self.batch_indices(epoch)[start:]
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is not None:
            for index in batches:
                yield tuple(t[index] for t in tensors)
            return
        if self.num_workers == 0:
            for index in batches:
                yield default_collate([self.dataset[i] for i in index.tolist()])
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.num_workers,
        )
        yield from loader
