"""The data types every layer shares, apart from the readers that make them (`nas.data`, `nas.streaming`,
`nas.synthetic`): a `Dataset` of `Split`s (uint8 images in memory, or a `SplitStream` from disk), the arrays
a reader returns (`RawArrays`), and the errors a data set that does not load raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class DataError(ValueError):
    """A data set could not be loaded; the message says where it looked and what it expected."""


class DataNotFoundError(DataError):
    pass


class DataFormatError(DataError):
    pass


class SplitStream(Protocol):
    """A split read from disk (`nas.streaming.StreamedSplit`): what training and evaluation ask of it."""

    def __len__(self) -> int: ...

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def batches(self, order, start: int, *, seed: int, augment: bool, pin: bool = False): ...


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8; (0, C, H, W) when the split streams from disk
    labels: torch.Tensor  # (N,) int64
    stream: SplitStream | None = None  # set: the split is read from disk batch by batch (nas.streaming)

    def __len__(self) -> int:
        return len(self.labels)

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) in order, `size` at a time, from memory or from disk."""
        if self.stream is not None:
            yield from self.stream.chunks(size)
            return
        for start in range(0, len(self), size):
            yield self.images[start : start + size], self.labels[start : start + size]


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of the train split, on the [0, 1] scale
    std: tuple[float, ...]
    superclasses: np.ndarray | None  # (num_classes,) class -> group, when the data set brings them
    flip_ok: bool  # whether a horizontal flip keeps every label

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32, zero mean and unit variance per channel."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1) * 255
        return (images.float() - mean) / std


@dataclass
class RawArrays:
    """What a loader returns: numpy arrays, NCHW uint8 images and int labels."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    superclasses: np.ndarray | None = None
    flip_ok: bool = False


__all__ = ["DataError", "DataFormatError", "DataNotFoundError", "Dataset", "RawArrays", "Split", "SplitStream"]
