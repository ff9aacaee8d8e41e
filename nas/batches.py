"""The batches a training run sees, by step: a seeded order per epoch, seeded crops and flips per step, so
batch s depends on (seed, s) only, and two models trained with one seed see the same images in the same order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nas.datasets import Dataset


class Batches:
    """The train split's batches by step on `device`, normalised, augmented when asked. Epoch e is a
    permutation seeded by (seed, e), step s's crops and flips by (seed, s): batch s depends on (seed, s) only,
    never on the model (two models trained with one seed see the same batches), the device, nor on where a
    run resumed. A split in memory moves to the device once, as uint8; a streamed one is decoded and
    augmented by its loader's workers, ahead of the steps."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, augment: bool, device="cpu"):
        self.data, self.seed, self.augment, self.device = dataset, seed, augment, torch.device(device)
        self.size = min(batch_size, len(dataset.train))
        self.per_epoch = len(dataset.train) // self.size  # full batches only: every step has the same shape
        self._order = (-1, None)  # (epoch, its permutation): computed once per epoch
        self.stream = dataset.train.stream
        if self.stream is None:
            self.images, self.labels = dataset.train.images.to(self.device), dataset.train.labels.to(self.device)
        self._streamed = (None, None)  # (the step it yields next, the stream's batch iterator)

    def indices(self, step: int) -> torch.Tensor:
        """Positions in the train split of step `step`'s images."""
        epoch, index = divmod(step, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, torch.randperm(len(self.data.train), generator=seeded_generator(self.seed, epoch)))
        return self._order[1][index * self.size : (index + 1) * self.size]

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is not None:
            images, labels = self._streamed_at(step)
        else:
            take = self.indices(step).to(self.device)
            images, labels = self.images[take], self.labels[take]
            if self.augment:
                images = augment(images, flip=self.data.flip_ok, generator=seeded_generator(self.seed, step, 1))
        return self.data.normalize(images), labels

    def _streamed_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        upcoming, batches = self._streamed
        if upcoming != step:  # the first step, or a jump: (re)start the loader there
            self.close()
            batches = self.stream.batches(self.indices, step, seed=self.seed, augment=self.augment,
                                          pin=self.device.type == "cuda")
        self._streamed = (step + 1, batches)
        images, labels = next(batches)
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop a streamed split's worker processes."""
        if self._streamed[1] is not None:
            self._streamed[1].close()
        self._streamed = (None, None)


def augment(images: torch.Tensor, *, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by 1/14 of the size, 2 px at 28 (and random horizontal flips when
    `flip`), for a whole uint8 batch at once: one gather, no per-image loop. Light: on short proxy budgets
    Fashion-MNIST's val accuracy after 300 steps fell from 0.71 to 0.67 with 3 px instead of 2."""
    B, C, H, W = images.shape
    pad = max(1, H // 14)
    padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    # Drawn on the CPU (`generator` is a CPU generator), applied on the images' device: the same crops anywhere.
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B, 1), generator=generator)
    rows = (dy + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
    cols = dx + torch.arange(W)
    if flip:
        mirrored = torch.rand(B, 1, generator=generator) < 0.5
        cols = torch.where(mirrored, cols.flip(-1), cols)
    cols = cols[:, None, None, :]  # (B, 1, 1, W)
    index = [torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols]
    return padded[tuple(i.to(images.device) for i in index)]


def seeded_generator(seed: int, *key: int) -> torch.Generator:
    """A generator seeded from (seed, *key), well mixed, the same in every process."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *key]).generate_state(1)[0]))


__all__ = ["Batches", "augment", "seeded_generator"]
