"""Random augmentation for datasets, from kornia (pure PyTorch, no torchvision needed).

``TRANSFORMS`` maps short names to transform classes: :class:`Compose` and kornia's 2D
augmentations (``RandomResizedCrop``, ``RandomHorizontalFlip``, ``RandomRotation``,
``ColorJitter``, ``Normalize``, ``Resize``...). Their arguments are kornia's.

kornia's augmentations work on batches (``B x C x H x W``); a dataset transforms one image
at a time. :class:`Compose` runs its transforms on the image as a batch of one and hands
back one image, so a chain of kornia augmentations is a per-sample transform.

Randomness: an augmentation draws from torch's global RNG, which the loader seeds for
every sample from ``(seed, epoch, index)`` (see :mod:`baton.data.loader`); nothing here keeps
its own generator.
"""

import inspect
from collections.abc import Callable
from typing import Annotated

import kornia.augmentation
import torch

from baton.kinds import Slot, TransformBase


class Compose(TransformBase):
    """Apply ``transforms`` in order to one image (or to a batch, as given).

    A ``C x H x W`` image goes through as a ``1 x C x H x W`` batch and comes back as
    ``C x H x W``, so kornia's batch augmentations compose into a per-sample transform.

    Args:
        transforms: The transforms, first applied first.
    """

    def __init__(self, transforms: Annotated[list[Callable], Slot("transform", many=True)]):
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        single = image.dim() == 3
        out = image.unsqueeze(0) if single else image
        for transform in self.transforms:
            out = transform(out)
        return out.squeeze(0) if single and out.dim() == 4 else out

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def _kornia_2d() -> dict[str, type]:
    table = {}
    for name, obj in vars(kornia.augmentation).items():
        if (
            inspect.isclass(obj)
            and issubclass(obj, kornia.augmentation.AugmentationBase2D)
            and not inspect.isabstract(obj)
            and not name.endswith("Base2D")
        ):
            table[name] = obj
    return table


TRANSFORMS: dict[str, type] = {**_kornia_2d(), "Compose": Compose}
