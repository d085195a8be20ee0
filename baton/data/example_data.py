"""Example data on disk: scikit-learn's digits written out as an image folder.

    python -m baton.data.example_data digits-images DIR [--size 16]

writes ``DIR/train/<digit>/<n>.png`` and ``DIR/val/<digit>/<n>.png`` (the split of
:class:`~baton.data.DigitsDataset`, each 8x8 image upscaled): a real folder of PNG files,
made from data that ships with scikit-learn, nothing downloaded. It is what
``configs/digits_images.yaml`` trains on; ``make run CONFIG=configs/digits_images.yaml``
writes it on first use.
"""

import argparse
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from baton.data.datasets import DigitsDataset


def write_digits_images(
    root: str | Path, *, size: int = 16, val_fraction: float = 0.2, split_seed: int = 0
) -> Path:
    """Write scikit-learn's digits as PNG files: ``root/{train,val}/<digit>/<n>.png``.

    The split is :class:`~baton.data.DigitsDataset`'s; each 8x8 image is upscaled to
    ``size`` x ``size`` (bilinear) as 8-bit grayscale. The folder appears whole or not at
    all (written next to it, then renamed); an existing folder is left as it is.

    Returns:
        ``root``.
    """
    root = Path(root)
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split in ("train", "val"):
            data = DigitsDataset(split, val_fraction=val_fraction, split_seed=split_seed)
            inputs, targets = data.tensors
            for number, (pixels, label) in enumerate(zip(inputs, targets, strict=True)):
                folder = staging / split / str(int(label))
                folder.mkdir(parents=True, exist_ok=True)
                array = (pixels.view(8, 8).numpy() * 255).round().astype(np.uint8)
                image = Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR)
                image.save(folder / f"{number:04d}.png")
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m baton.data.example_data digits-images DIR [--size N]``."""
    parser = argparse.ArgumentParser(prog="python -m baton.data.example_data")
    commands = parser.add_subparsers(dest="command", required=True)
    digits = commands.add_parser("digits-images", help="write the digits as PNG files")
    digits.add_argument("root", help="folder to create (left alone if it exists)")
    digits.add_argument("--size", type=int, default=16, help="side of each image in pixels")
    args = parser.parse_args(argv)
    existed = Path(args.root).exists()
    root = write_digits_images(args.root, size=args.size)
    print(f"{root} already exists; left as it is" if existed else f"wrote {root}")


if __name__ == "__main__":
    main()
