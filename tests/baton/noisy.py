"""A dataset and a model that draw from the global generators, as user code does.

Configs reach them through ``BATON_ALLOWED_MODULES=tests``. ``ON_FORWARD``, when set, is
called at every training forward: a test hands control to another thread there, so that
thread's draws fall at known points of the run.
"""

import random
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from baton.data import SyntheticClassification
from baton.models import MLP

ON_FORWARD: Callable[[], None] | None = None


class AugmentedSynthetic(Dataset):
    """``SyntheticClassification`` with per-sample noise from ``random``, numpy and torch."""

    def __init__(self, num_samples: int = 256, seed: int = 0):
        self.inputs, self.targets = SyntheticClassification(num_samples, seed=seed).tensors

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        noise = random.gauss(0, 0.1) + float(np.random.normal(0, 0.1))
        return self.inputs[index] + noise + 0.1 * torch.randn(8), self.targets[index]


class PingedMLP(MLP):
    """An MLP that calls ``ON_FORWARD`` at every training forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and ON_FORWARD is not None:
            ON_FORWARD()
        return super().forward(x)
