"""Per-image evaluation: which validation images a trained model gets right (the confirmation's paired tests
compare arms image by image, and a dense trial's top-rung run counts as its seed's confirmation run)."""

from __future__ import annotations

import numpy as np
import torch

from nas.trainer import EVAL_BATCH


@torch.inference_mode()
def per_image_correct(model: torch.nn.Module, dataset) -> np.ndarray:
    """(n_val,) bool: which validation images `model` classifies right."""
    model.eval()
    hits = []
    for images, labels in dataset.val.chunks(EVAL_BATCH):  # held in memory or streamed from disk alike
        hits.append((model(dataset.normalize(images)).argmax(-1) == labels).numpy())
    return np.concatenate(hits) if hits else np.zeros(0, dtype=bool)


__all__ = ["per_image_correct"]
