"""A loader whose batches are a function of (seed, epoch).

``ResumableLoader`` makes a run resumable at any iteration, bit for bit, with or without
worker processes and random augmentation:

* the order of epoch ``e`` depends only on the seed and ``e``, and
  :meth:`ResumableLoader.iter_epoch` starts at any batch of the epoch by slicing that
  order (nothing is read or replayed to get there);
* every sample is read with python's, numpy's and torch's RNGs seeded from
  ``(seed, e, index)`` (:func:`sample_seeds`), so a random augmentation draws the same numbers whichever worker
  reads the sample, however many workers there are, whatever was prefetched, and
  wherever the run was resumed. In the main process (``num_workers: 0``) the RNG states
  of training are put back after each batch, so reading data never shifts dropout;
* worker processes start once and serve every epoch (and every task of a flow run that
  keeps the pipeline live) until :meth:`ResumableLoader.close`.

Tensor datasets whose samples are their tensors' rows are sliced batch by batch (no
per-sample Python work; :func:`sliced_tensors` says which). A sample that
cannot be read ends the epoch with a :class:`~baton.errors.DataError` naming it, not with
a worker's traceback. docs/data.md explains the choices (and why not torchdata's
``StatefulDataLoader``).
"""

import atexit
import random
import signal
import traceback
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate, get_worker_info

from baton.data.datasets import TensorPairDataset
from baton.errors import DataError
from baton.randomness import cpu_rng_states, set_cpu_rng_states

# Multiplier mixing the seed and the epoch into one generator seed.
_EPOCH_MIX = 1_000_003


def sliced_tensors(dataset: Dataset) -> tuple[torch.Tensor, ...] | None:
    """The tensors a batch of ``dataset`` can be sliced from, or ``None`` if its samples
    must be read one by one through its ``__getitem__``.

    Decided by the type, not by a ``tensors`` attribute: slicing is what ``__getitem__``
    does only for :class:`TensorPairDataset` and torch's ``TensorDataset`` as they are
    (their subclasses included) when the class keeps their ``__getitem__``. A subclass
    that augments, crops or relabels in its own ``__getitem__`` is read through it.
    """
    getitem = type(dataset).__getitem__
    if getitem is TensorPairDataset.__getitem__ or getitem is TensorDataset.__getitem__:
        return dataset.tensors
    return None


def sample_seeds(seed: int, epoch: int, count: int) -> list[int]:
    """The RNG seed of every sample of ``epoch``, by dataset index: 63-bit integers drawn
    from numpy's PCG64 seeded with ``SeedSequence((seed, epoch))``. Sample ``i``'s seed is
    a function of (seed, epoch, i) only, computed for the whole epoch at once."""
    rng = np.random.default_rng((seed, epoch))
    return rng.integers(0, 2**63, size=count, dtype=np.int64).tolist()


def seed_sample_rngs(value: int) -> None:
    """Seed python's, numpy's and torch's CPU RNG for one sample.

    Only torch's CPU generator is seeded (``torch.manual_seed`` would also reseed CUDA,
    which in the main process is training's RNG).
    """
    random.seed(value)
    np.random.seed(value & 0xFFFFFFFF)  # numpy's global RNG takes 32-bit seeds
    torch.default_generator.manual_seed(value)


class _Failure:
    """A sample that could not be read, carried to the main process as data.

    A worker's exception would reach the main process as a new exception whose message
    is the worker's whole traceback; carried as data it becomes one clear line there.
    """

    def __init__(self, message: str, details: str):
        self.message = message
        self.details = details

    def error(self) -> DataError:
        err = DataError(self.message)
        err.__notes__ = [self.details]  # the reader's traceback, for a dataset's author
        return err


class _SeededSamples(Dataset):
    """The dataset as workers see it: keys are ``(index, sample seed)``, and each sample
    is read with every RNG seeded from its key (see :func:`sample_seeds`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list:
        in_main_process = get_worker_info() is None
        saved = cpu_rng_states() if in_main_process else None
        try:
            return [self._read(*key) for key in keys]
        finally:
            if saved is not None:
                set_cpu_rng_states(saved)

    def _read(self, index: int, seed: int) -> Any:
        seed_sample_rngs(seed)
        try:
            return self.dataset[index]
        except DataError as err:
            return _Failure(str(err), traceback.format_exc())
        except Exception as err:
            name = type(self.dataset).__name__
            message = f"sample {index} of {name} cannot be read: {type(err).__name__}: {err}"
            return _Failure(message, traceback.format_exc())


def _worker_init(worker_id: int) -> None:
    # A SIGTERM sent to the whole process group (a cancel, a pod stopped) must not kill
    # the workers under the main process: it finishes its iteration and writes an
    # emergency checkpoint first, and a worker's death would interrupt that with torch's
    # "worker killed by signal" error. Workers exit with the main process either way.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collate(samples: list) -> Any:
    for sample in samples:
        if isinstance(sample, _Failure):
            return sample
    return default_collate(samples)


def _on_meta(batch: Any, size: int) -> Any:
    """``batch`` (of one sample) with every tensor replaced by a meta tensor of its dtype
    and shape, with ``size`` samples; containers as the loop's device transfer keeps them."""
    if isinstance(batch, torch.Tensor):
        return torch.empty((size, *batch.shape[1:]), dtype=batch.dtype, device="meta")
    if isinstance(batch, (list, tuple)):
        return type(batch)(_on_meta(b, size) for b in batch)
    if isinstance(batch, dict):
        return {k: _on_meta(v, size) for k, v in batch.items()}
    return batch


class _EpochBatches:
    """The batch sampler of the one DataLoader a ``ResumableLoader`` keeps: it yields
    the keys of the epoch and start last set. A DataLoader fixes its sampler when it is
    built, and its persistent workers keep their copy of the dataset, so each sample's
    seed travels inside its key."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)


class ResumableLoader:
    """Batches of a dataset in an order fixed by ``(seed, epoch)``, augmented reproducibly.

    Args:
        dataset: Any map-style dataset; tensor datasets that keep their class's
            ``__getitem__`` are sliced directly (:func:`sliced_tensors`).
        batch_size: Samples per batch.
        shuffle: Shuffle each epoch (deterministically).
        seed: Seed of the shuffle and of every sample's RNGs.
        drop_last: Drop the last, smaller batch.
        num_workers: Worker processes reading samples (not for tensor datasets).
        pin_memory: Put batches in page-locked memory (faster copies to a GPU).
        persistent_workers: Keep the workers from one epoch to the next.
        prefetch_factor: Batches each worker reads ahead (torch's default: 2).
        rank: This process's rank among ``world_size`` training processes.
        world_size: Training processes sharing each batch. ``batch_size`` is then the
            *global* batch: every batch of the epoch's one global order is split across
            the ranks, rank ``r`` taking its samples ``r, r + world_size, ...``, so the
            samples an epoch holds, their order and each sample's augmentation do not
            depend on the number of processes.

    A training loader should call :meth:`check_split` (a rank without a sample would stall
    the others' gradients); an evaluation may give a rank an empty share.
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
        pin_memory: bool = False,
        persistent_workers: bool = True,
        prefetch_factor: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
        if prefetch_factor is not None and num_workers == 0:
            raise ValueError("prefetch_factor needs num_workers > 0; remove it or add workers")
        if len(dataset) == 0:
            raise DataError(f"{_describe(dataset)} is empty: it has no samples to train on")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.rank = rank
        self.world_size = world_size
        self._batches = _EpochBatches()
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def check_split(self) -> None:
        """Refuse a split that would leave a rank without a sample in some batch: the
        global batch, or the epoch's last (smaller) batch, holds fewer samples than there
        are ranks.

        Raises:
            DataError: Naming the sizes and the fix.
        """
        n = len(self.dataset)
        last = n % self.batch_size
        smallest = self.batch_size if (self.drop_last or last == 0) else last
        if smallest < self.world_size:
            which = "a batch" if smallest == self.batch_size else "the epoch's last batch"
            raise DataError(
                f"{which} holds {smallest} samples, fewer than the {self.world_size} "
                f"processes that share it ({n} samples, global batch {self.batch_size}); "
                "set drop_last: true, or use fewer processes or a larger batch_size"
            )

    def local_share(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's samples of a global batch (``index[rank::world_size]``)."""
        if self.world_size == 1:
            return index
        return index[self.rank :: self.world_size]

    def loss_share(self, step: int) -> float:
        """How much of batch ``step``'s loss this rank's samples carry, relative to an even
        split: ``local samples * world_size / global samples``. Gradients averaged across
        ranks then equal the gradient of the whole batch's mean loss, however unevenly a
        batch divides (1.0 when it divides evenly, and always with one process)."""
        if self.world_size == 1:
            return 1.0
        n = len(self.dataset)
        total = min(self.batch_size, n - step * self.batch_size)
        local = len(range(self.rank, total, self.world_size))
        return local * self.world_size / total

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
        """Yield the batches of ``epoch`` from batch number ``start`` on.

        Raises:
            DataError: A sample could not be read (the message names it).
        """
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be between 0 and {len(self)}, got {start}")
        batches = [self.local_share(b) for b in self.batch_indices(epoch)[start:]]
        tensors = sliced_tensors(self.dataset)
        if tensors is not None:
            for index in batches:
                yield tuple(t[index] for t in tensors)
            return
        seeds = sample_seeds(self.seed, epoch, len(self.dataset))
        # An empty share (an evaluation's small last batch on several processes) is not
        # read: a training loader never has one (check_split).
        self._batches.batches = [[(i, seeds[i]) for i in b.tolist()] for b in batches if len(b)]
        for batch in self._dataloader():
            if isinstance(batch, _Failure):
                raise batch.error()
            yield batch

    def meta_batch(self) -> Any | None:
        """The first batch's structure, shapes and dtypes, on the meta device: sample 0
        read as the loader reads it (its RNGs seeded, the training RNG states put back),
        collated, with the batch dimension of the first batch. Nothing is allocated for
        the batch, so a model can be tried on it (see ``Quotas.check_model``).

        Returns:
            The batch; ``None`` if sample 0 cannot be read (the run reports that when it
            reaches the sample).
        """
        size = len(self.local_share(torch.arange(min(self.batch_size, len(self.dataset)))))
        tensors = sliced_tensors(self.dataset)
        if tensors is not None:
            return tuple(_on_meta(t[:1], size) for t in tensors)
        seed = sample_seeds(self.seed, 0, 1)[0]
        sample = _SeededSamples(self.dataset)[(0, seed)]
        if isinstance(sample, _Failure):
            return None
        return _on_meta(_collate([sample]), size)

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self.num_workers > 0
            self._loader = DataLoader(
                _SeededSamples(self.dataset),
                batch_sampler=self._batches,
                num_workers=self.num_workers,
                collate_fn=_collate,
                worker_init_fn=_worker_init,
                pin_memory=self.pin_memory,
                persistent_workers=workers and self.persistent_workers,
                prefetch_factor=self.prefetch_factor,
                # Without its own generator, each DataLoader iterator draws its workers'
                # base seed from the global torch RNG: training's RNG would move.
                generator=torch.Generator().manual_seed(self.seed),
            )
            if workers:
                _OPEN_LOADERS.add(self)
        return self._loader

    def close(self) -> None:
        """Stop the worker processes (a later epoch starts new ones)."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            # DataLoader has no public close. This is what the iterator's __del__ calls;
            # calling it here does not wait for a suspended epoch generator to be freed.
            iterator._shutdown_workers()


# Loaders whose worker processes may still run; closed when the interpreter exits.
_OPEN_LOADERS: "weakref.WeakSet[ResumableLoader]" = weakref.WeakSet()


def _close_open_loaders() -> None:
    for loader in list(_OPEN_LOADERS):
        loader.close()


# Workers ignore SIGTERM (_worker_init), and multiprocessing's exit handler stops daemonic
# children with SIGTERM and then joins them: a process that ends with a loader still open
# (an evaluation's live pipeline, a script's global) would wait for its workers forever.
# atexit runs handlers last in, first out: this one, registered after torch (and with it
# multiprocessing and the DataLoader's exit flag) was imported, runs before theirs, while
# the DataLoader can still shut its workers down.
atexit.register(_close_open_loaders)


def check_same_classes(train: Dataset, val: Dataset) -> None:
    """Refuse train and validation datasets whose class-to-label maps differ.

    Datasets that keep a ``class_to_idx`` (image folders, torchvision's included) would
    otherwise score validation against the wrong labels without any error.

    Raises:
        DataError: Naming both datasets and the classes found in only one of them.
    """
    train_map = getattr(train, "class_to_idx", None)
    val_map = getattr(val, "class_to_idx", None)
    if train_map is None or val_map is None or dict(train_map) == dict(val_map):
        return
    only_train = sorted(set(train_map) - set(val_map))
    only_val = sorted(set(val_map) - set(train_map))
    if only_train or only_val:
        differences = f"only in train: {only_train or 'none'}; only in val: {only_val or 'none'}"
    else:
        differences = "the same class names map to different labels"
    raise DataError(
        f"train data {_describe(train)} and val data {_describe(val)} have different classes "
        f"({differences}); give both the same class folders, or list them in 'classes:'"
    )


def _describe(dataset: Dataset) -> str:
    root = getattr(dataset, "root", None)
    name = type(dataset).__name__
    return f"{name} at {str(root)!r}" if root is not None else name
