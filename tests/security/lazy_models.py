"""A lazy model that cannot run on the meta device; configs reach it through
``BATON_ALLOWED_MODULES=tests``."""

import torch
from torch import nn


class GatedLazyLinear(nn.Module):
    """A ``LazyLinear`` behind a branch on the data's values, which meta tensors do not
    have: its parameters can only be counted after a real forward pass."""

    def __init__(self, out_features: int):
        super().__init__()
        self.linear = nn.LazyLinear(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.isfinite().all():
            return self.linear(x)
        return self.linear(x.nan_to_num())
