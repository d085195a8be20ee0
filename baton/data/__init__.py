"""Data: what a sample is, and the order samples come in, resumable at any batch.

Owns the datasets baton ships (``datasets.py``: digits, synthetic blobs, image folders),
the per-sample augmentations (``transforms.py``, kornia, imported on first use: it is
slow to import), the loader whose epoch ``e`` is a function of ``(seed, e)`` and starts at
any batch (``loader.py``), and the digits written out as an image folder
(``example_data.py``). It reads the operator's data roots from ``trust``; it must not
import the registry, the engine, the config or the run packages: they build on it.
"""

from baton.data.datasets import (
    DATASETS,
    DigitsDataset,
    ImageFolder,
    SyntheticClassification,
    TensorPairDataset,
    load_digits_arrays,
)
from baton.data.loader import (
    ResumableLoader,
    check_same_classes,
    sample_seeds,
    seed_sample_rngs,
    sliced_tensors,
)

__all__ = [
    "DATASETS",
    "DigitsDataset",
    "ImageFolder",
    "ResumableLoader",
    "SyntheticClassification",
    "TensorPairDataset",
    "check_same_classes",
    "load_digits_arrays",
    "sample_seeds",
    "seed_sample_rngs",
    "sliced_tensors",
]
