"""The datasets baton ships: tensors in memory, and image files on disk.

:class:`DigitsDataset` (scikit-learn's digits, no download) and
:class:`SyntheticClassification` (Gaussian blobs, for tests) hold their samples as two
tensors (:class:`TensorPairDataset`), which the loader slices batch by batch.
:class:`ImageFolder` reads the layout torchvision's ``ImageFolder`` reads
(``root/<class>/<image>``) with Pillow, so it needs neither torchvision nor a GPU build
of it. It checks the folder when it is built, so that an empty folder, a class without
images or a file that is not an image stops a run before training, naming the folder or
file, instead of a worker failing in the middle of epoch 7.
"""

import functools
import gzip
import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch.utils.data import Dataset

from baton.errors import DataError
from baton.kinds import DataPath, Slot
from baton.trust.allowances import Trust

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
# Problems listed in one error before the rest are counted.
_MAX_LISTED = 10


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

    Its size is bounded (at most 2**20 samples of 1,024 features, 4 GiB), since a config
    from the Run form chooses it and it is built in memory.

    Args:
        num_samples: Number of samples.
        num_features: Input size.
        num_classes: Number of classes.
        seed: Seed of the generated data.
    """

    def __init__(
        self,
        num_samples: Annotated[int, Field(ge=1, le=1 << 20)] = 256,
        num_features: Annotated[int, Field(ge=1, le=1024)] = 8,
        num_classes: Annotated[int, Field(ge=1, le=1024)] = 3,
        seed: Annotated[int, Field(ge=0)] = 0,
    ):
        generator = torch.Generator().manual_seed(seed)
        centers = torch.randn(num_classes, num_features, generator=generator) * 2
        targets = torch.randint(num_classes, (num_samples,), generator=generator)
        inputs = centers[targets] + torch.randn(num_samples, num_features, generator=generator)
        super().__init__(inputs, targets)


class ImageFolder(Dataset):
    """Images in one folder per class (``root/cat/001.png``), labelled by folder.

    Each sample is ``(image, label)``: the image a ``C x H x W`` float32 tensor in
    [0, 1] (the input kornia's augmentations and torchvision's v2 transforms take), the
    label the class's index in ``classes``. Attributes ``classes``, ``class_to_idx``,
    ``samples`` and ``targets`` are those of torchvision's ``ImageFolder``.

    Args:
        root: Folder with one sub-folder per class.
        transform: Applied to each image (e.g. a ``Compose`` of augmentations).
        target_transform: Applied to each label.
        mode: Pillow mode each image is converted to (``'RGB'``, ``'L'`` for grayscale);
            ``None`` keeps each file's own.
        extensions: File name endings that count as images (case does not matter).
        classes: The class folders to use, in label order. Default: every sub-folder,
            sorted. Listing them makes a split that lacks one an error.
        check_files: Open every file once now (Pillow's ``verify``: header and, for PNG,
            checksums) so a bad file fails before training. Costs a read of the folder;
            turn off for folders too large to read twice.

    Raises:
        DataError: ``root`` is not a folder, has no class folders, a class folder has
            no images, or (with ``check_files``) a file is not a readable image.
        UntrustedInputError: A class folder or an image is a link that leads outside
            the project and the operator's data roots (``Trust.check_data_path``).
    """

    def __init__(
        self,
        root: Annotated[str, DataPath()],
        transform: Annotated[Callable | None, Slot("transform")] = None,
        target_transform: Annotated[Callable | None, Slot("transform")] = None,
        *,
        mode: str | None = "RGB",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        classes: Sequence[str] | None = None,
        check_files: bool = True,
    ):
        self.root = str(root)
        self.transform = transform
        self.target_transform = target_transform
        self.mode = mode
        self.extensions = tuple(e.lower() for e in extensions)
        self.classes = (
            _checked_classes(self.root, classes)
            if classes is not None
            else _class_folders(self.root)
        )
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples = _scan(self.root, self.classes, self.extensions, Trust.from_environment())
        self.targets = [target for _, target in self.samples]
        if check_files:
            _check_images([path for path, _ in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        image = read_image(path, self.mode)
        if self.transform is not None:
            image = self.transform(image)
            if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[0] == 1:
                raise DataError(
                    f"ImageFolder at {self.root!r}: the transform returned a batch "
                    f"{tuple(image.shape)} for one image; put kornia augmentations inside "
                    "{type: Compose, transforms: [...]} or give them keepdim: true"
                )
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def read_image(path: str, mode: str | None = "RGB") -> torch.Tensor:
    """A file as a ``C x H x W`` float32 tensor in [0, 1], decoded by Pillow.

    Raises:
        DataError: The file cannot be read or decoded, naming it.
    """
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert(mode) if mode else image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: not a readable image ({err}); replace or remove it") from err
    if pixels.dtype != np.uint8:
        raise DataError(
            f"{path}: {pixels.dtype} pixels are not supported; convert it to 8 bits, or set "
            "mode: RGB or L"
        )
    tensor = torch.from_numpy(pixels.copy())
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return tensor.float().div_(255)


def _checked_classes(root: str, classes: Sequence[str]) -> list[str]:
    """``classes`` as given, each a plain sub-folder name of ``root``: a name with a path
    separator or ``..``, or one that resolves outside ``root`` (a link), would read files
    outside the data roots the operator allowed."""
    real_root = os.path.realpath(root)
    for name in classes:
        folder = os.path.realpath(os.path.join(root, str(name)))
        plain = (
            str(name) not in ("", ".", "..") and "/" not in str(name) and os.sep not in str(name)
        )
        if not plain or os.path.dirname(folder) != real_root:
            raise DataError(
                f"ImageFolder at {root!r}: classes entry {name!r} is not a sub-folder name "
                "of root; list the names of root's own class folders"
            )
    return list(classes)


def _class_folders(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise DataError(f"image folder {root!r} does not exist or is not a folder")
    with os.scandir(root) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root!r} has no class folders; put each class's images in a "
            f"sub-folder, e.g. {os.path.join(root, 'cat', '001.png')}"
        )
    return classes


def _scan(
    root: str, classes: list[str], extensions: tuple[str, ...], trust: Trust
) -> list[tuple[str, int]]:
    samples: list[tuple[str, int]] = []
    missing, empty = [], []
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            missing.append(folder)
            continue
        # The root was checked when the config was; a class folder or an image may still
        # be a link, and must lead inside the data roots too.
        trust.check_data_path(folder, f"ImageFolder at {root!r}: class folder")
        found = []
        # Symbolic links to folders below a class folder are not followed (a link must
        # not pull in the whole disk) and only regular files count: a FIFO named x.png
        # would block the reader.
        for parent, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                path = os.path.join(parent, file)
                if file.lower().endswith(extensions) and os.path.isfile(path):
                    if os.path.islink(path):
                        trust.check_data_path(path, f"ImageFolder at {root!r}: image")
                    found.append((path, index))
        if not found:
            empty.append(folder)
        samples += found
    if missing:
        raise DataError(
            f"class folders missing: {', '.join(missing[:_MAX_LISTED])}; create them or "
            "remove the classes from 'classes:'"
        )
    if empty:
        raise DataError(
            f"no images ({', '.join(extensions)}) in {', '.join(empty[:_MAX_LISTED])}"
            f"{_more(empty)}; add images or remove the folder"
        )
    return samples


def _check_images(paths: list[str]) -> None:
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as err:  # Pillow raises many types for damaged files
            bad.append(f"{path} ({err})")
    if bad:
        raise DataError(
            f"{len(bad)} file(s) are not readable images: {'; '.join(bad[:_MAX_LISTED])}"
            f"{_more(bad)}; replace or remove them"
        )


def _more(items: list) -> str:
    return f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""


DATASETS: dict[str, type[Dataset]] = {
    "DigitsDataset": DigitsDataset,
    "ImageFolder": ImageFolder,
    "SyntheticClassification": SyntheticClassification,
}
