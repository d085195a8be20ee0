"""Tiny image folders written with Pillow, and an image dataset that kills its worker."""

import os
import signal
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import get_worker_info

from baton.data.datasets import ImageFolder


def make_image_folder(root: Path, *, classes=("a", "b", "c"), per_class=8, size=12) -> Path:
    """``root/<class>/<n>.png``: grayscale noise whose brightness depends on the class."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = rng.normal(60 + 60 * label, 30, (size, size)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{n:03d}.png")
    return root


def augmentation(size: int = 10) -> dict:
    """A random crop and flip, as a config's transform."""
    return {
        "type": "Compose",
        "transforms": [
            {"type": "RandomResizedCrop", "size": [size, size], "scale": [0.5, 1.0]},
            {"type": "RandomHorizontalFlip"},
        ],
    }


class DyingImageFolder(ImageFolder):
    """An ImageFolder whose worker SIGKILLs itself when it reads sample ``die_at`` for the
    ``on_read``-th time, once: reads and the death are counted in the file ``budget``, so
    a retry (or a new process) reads on."""

    def __init__(self, *args, die_at: int, budget: str, on_read: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.die_at = die_at
        self.budget = Path(budget)
        self.on_read = on_read

    def __getitem__(self, index):
        if index == self.die_at and get_worker_info() is not None:
            reads = int(self.budget.read_text()) if self.budget.exists() else 0
            self.budget.write_text(str(reads + 1))
            if reads + 1 == self.on_read:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)
