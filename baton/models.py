"""Small models for the example pipelines and the tests."""

from typing import Annotated

import torch
from pydantic import Field
from torch import nn


class MLP(nn.Module):
    """A multi-layer perceptron for flat feature vectors.

    Args:
        in_features: Input size.
        hidden: Sizes of the hidden layers.
        num_classes: Output size.
        dropout: Dropout after each hidden layer (exercises the RNG on resume).
    """

    def __init__(
        self,
        in_features: Annotated[int, Field(ge=1)],
        num_classes: Annotated[int, Field(ge=1)],
        hidden: list[Annotated[int, Field(ge=1)]] | tuple[Annotated[int, Field(ge=1)], ...] = (64,),
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """A two-block CNN for small single-channel images (8x8 digits).

    Args:
        num_classes: Output size.
        channels: Channels of the two convolution blocks.
        in_channels: Input channels.
        image_size: Height and width of the (square) input.
        dropout: Dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: Annotated[int, Field(ge=1)] = 10,
        channels: Annotated[int, Field(ge=1)] = 32,
        in_channels: Annotated[int, Field(ge=1)] = 1,
        image_size: Annotated[int, Field(ge=1)] = 8,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    ):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.LazyLinear(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            side = int(x.shape[1] ** 0.5)
            x = x.view(x.shape[0], 1, side, side)
        return self.head(self.features(x))


MODELS: dict[str, type[nn.Module]] = {"MLP": MLP, "SmallCNN": SmallCNN}
