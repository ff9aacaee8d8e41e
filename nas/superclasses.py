"""Super-classes: the groups of classes a per-image router learns to tell apart, one per expert.

From the data set when it brings them (CIFAR-100's 20 coarse labels), else discovered as in Mobile V-MoE:
train a small dense model, take its confusion matrix on the validation split, symmetrise it into a graph
whose edge weights say how often two classes are mistaken for each other, and cut that graph into E groups
with spectral clustering. Classes that are confused end up in one group, so the router's task is easy and
each expert specialises in telling similar classes apart.
"""

from __future__ import annotations

import glob
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nas.config import write_atomically
from nas.datasets import Dataset
from nas.recipe import Schedule, TrainRecipe
from nas.trainer import train
from search_spaces import ArchConfig

# Discovery's default budget: enough for a dense model to make class-specific mistakes, not a final model.
# No augmentation: on a budget this short it costs accuracy (Fashion-MNIST: 0.80 -> 0.67 after 300 steps).
# Counted in steps, never in seconds: a time cap stopped it after 89 of 842 steps on a loaded machine, so the
# groups depended on the load. 2 epochs, at most 2,000 steps (Fashion-MNIST's 2 epochs are 842; ImageNet's
# would be 20,000). Fashion-MNIST's take ~75 s on 2 idle cores.
DISCOVERY_RECIPE = TrainRecipe(epochs=2, steps=2000, batch_size=128, lr=2e-3, augment=False, eval_every=10**9)


log = logging.getLogger("vmoe_nas.superclasses")


class SuperclassError(ValueError):
    """A super-class mapping is malformed; the message names the file or the field."""


@dataclass(frozen=True, eq=False)  # arrays inside: compare to_dict() instead
class SuperclassMap:
    class_to_group: np.ndarray  # (num_classes,) int
    num_groups: int
    confusion: np.ndarray | None = None  # (num_classes, num_classes) counts on val, rows = true class
    source: str = "dataset"  # "dataset", or "confusion:<arch name>" for discovered groups

    def __post_init__(self):
        mapping = np.asarray(self.class_to_group)
        if mapping.ndim != 1 or not np.issubdtype(mapping.dtype, np.integer):
            raise SuperclassError(f"class_to_group must be a list of integers, got {self.class_to_group!r}")
        if len(mapping) and not 0 <= mapping.min() <= mapping.max() < self.num_groups:
            raise SuperclassError(f"class_to_group values must be in [0, {self.num_groups}), got {mapping.tolist()}")
        object.__setattr__(self, "class_to_group", mapping.astype(np.int64))

    @property
    def groups(self) -> list[list[int]]:
        return [np.flatnonzero(self.class_to_group == g).tolist() for g in range(self.num_groups)]

    def to_dict(self) -> dict:
        confusion = None if self.confusion is None else np.asarray(self.confusion).tolist()
        return {"groups": self.groups, "class_to_group": self.class_to_group.tolist(), "confusion": confusion,
                "source": self.source}

    @classmethod
    def from_dict(cls, data) -> SuperclassMap:
        if not isinstance(data, dict) or not {"groups", "class_to_group"} <= set(data):
            raise SuperclassError("expected a JSON object with 'groups' and 'class_to_group'")
        groups = data["groups"]
        result = cls(np.asarray(data["class_to_group"]), len(groups),
                     None if data.get("confusion") is None else np.asarray(data["confusion"]),
                     data.get("source", "dataset"))
        if result.groups != groups:
            raise SuperclassError(f"'groups' {groups} disagrees with 'class_to_group' {result.class_to_group.tolist()}")
        return result

    def save(self, path: str | Path) -> Path:
        """Written atomically: a worker reading the cache meanwhile (or another writing it) sees a whole file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> SuperclassMap:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise SuperclassError(f"no super-class file at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, SuperclassError, ValueError, TypeError) as error:
            raise SuperclassError(f"{path}: not a valid super-class mapping ({error})") from None


def cluster_confusion(confusion: np.ndarray, groups: int, seed: int = 0) -> np.ndarray:
    """class -> group, from a (K, K) confusion matrix (rows = true class): rows normalised to rates (so large
    classes do not dominate), diagonal dropped, symmetrised, spectrally clustered. Groups are numbered in
    order of their smallest class, so the same partition always gives the same mapping."""
    from sklearn.cluster import SpectralClustering

    confusion = np.asarray(confusion, dtype=np.float64)
    k = len(confusion)
    if confusion.shape != (k, k) or not np.isfinite(confusion).all() or (confusion < 0).any():
        raise SuperclassError(f"confusion must be a square matrix of non-negative counts, got shape {confusion.shape}")
    if not 1 <= groups <= k:
        raise SuperclassError(f"groups must be in [1, {k} classes], got {groups}")
    if groups in (1, k):
        return np.zeros(k, np.int64) if groups == 1 else np.arange(k)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    np.fill_diagonal(rates, 0)
    affinity = (rates + rates.T) / 2 + 1e-6  # the floor keeps the graph connected when classes never mix
    np.fill_diagonal(affinity, 0)
    labels = SpectralClustering(groups, affinity="precomputed", assign_labels="cluster_qr",
                                random_state=seed).fit_predict(affinity)
    _, first = np.unique(labels, return_index=True)
    renumber = {labels[i]: g for g, i in enumerate(sorted(first))}
    return np.array([renumber[label] for label in labels], np.int64)


def confusion_matrix(model: torch.nn.Module, dataset: Dataset) -> np.ndarray:
    """(K, K) counts of (true class, predicted class) on the val split."""
    model.eval()
    predictions, labels = [], []
    with torch.inference_mode():
        for images, chunk_labels in dataset.val.chunks(1024):  # in memory or streamed from disk
            predictions.append(model(dataset.normalize(images)).argmax(-1))
            labels.append(chunk_labels)
    k = dataset.num_classes
    pairs = torch.cat(labels) * k + torch.cat(predictions)
    return torch.bincount(pairs, minlength=k * k).reshape(k, k).numpy()


def discovery_arch(dataset: Dataset) -> ArchConfig:
    """A small, fast dense ViT for the data set: depth 4, width 64, patches giving at most 4x4 tokens (a
    Fashion-MNIST step is 3x faster than with 7x7, and only the pattern of mistakes is wanted)."""
    size = dataset.image_size
    patch = next(p for p in range(1, size + 1) if size % p == 0 and size // p <= 4)
    return ArchConfig(image_size=size, in_channels=dataset.in_channels, patch_size=patch,
                      num_classes=dataset.num_classes, depth=4, width=64, num_heads=4)


def superclasses_for(dataset: Dataset, groups: int, *, cache_dir=None, seed: int = 0, arch: ArchConfig | None = None,
                     recipe: TrainRecipe | None = None, progress: bool = False, device: str | None = None,
                     num_threads: int | None = None) -> SuperclassMap:
    """The data set's own super-classes when it has `groups` of them, else discovered from the confusion of a
    small dense model (`arch`, default `discovery_arch`) trained with `recipe` (default DISCOVERY_RECIPE) on
    `device` with `num_threads` (None: the recipe's, else OMP_NUM_THREADS, else the cores this process may use).
    With `cache_dir`, a discovered mapping is stored as `<dataset>-g<groups>-s<seed>.json` and reused; one whose
    training a time budget (`recipe.seconds`) cut short is used once and never cached: it depends on the load."""
    own = dataset.superclasses
    if own is not None and set(own.tolist()) == set(range(groups)):
        return SuperclassMap(own, groups, source="dataset")
    cache = Path(cache_dir) / cache_name(dataset.name, groups, seed) if cache_dir else None
    if cache and cache.is_file():
        return SuperclassMap.load(cache)
    arch = arch or discovery_arch(dataset)
    source = f"confusion:{arch.name}"
    confusion = _cached_confusion(Path(cache_dir), dataset.name, seed, source) if cache else None
    truncated = False
    if confusion is None:
        recipe = TrainRecipe.from_dict({**(recipe or DISCOVERY_RECIPE).to_dict(), "seed": seed,
                                        **({"device": device} if device else {}),
                                        **({"num_threads": num_threads} if num_threads else {})})
        result = train(arch, dataset, recipe, progress=progress, label=f"super-class discovery ({groups} groups)")
        planned = Schedule.of(recipe, max(1, len(dataset.train) // recipe.batch_size)).steps
        truncated = planned is None or result.steps < planned
        if truncated:
            log.warning("SUPER-CLASS DISCOVERY WAS CUT BY ITS TIME BUDGET (seconds=%g) after %d of %s steps: its "
                        "groups depend on this machine's load and are not cached; give the recipe a budget in "
                        "steps or epochs only", recipe.seconds, result.steps, planned or "unbounded")
        confusion = confusion_matrix(result.model, dataset)
    found = SuperclassMap(cluster_confusion(confusion, groups, seed), groups, confusion, source)
    if cache and not truncated:
        found.save(cache)
    return found


def _cached_confusion(cache_dir: Path, dataset_name: str, seed: int, source: str) -> np.ndarray | None:
    """The confusion matrix of a cached discovery with the same data set, seed and model but another group
    count: one discovery model serves every E (like the cache key, this ignores the recipe)."""
    for path in sorted(cache_dir.glob(f"{glob.escape(_cache_stem(dataset_name))}-g*-s{seed}.json")):
        found = SuperclassMap.load(path)
        if found.confusion is not None and found.source == source:
            return found.confusion
    return None


def cache_name(dataset_name: str, groups: int, seed: int) -> str:
    """File name keyed by data set, group count and seed."""
    return f"{_cache_stem(dataset_name)}-g{groups}-s{seed}.json"


def _cache_stem(dataset_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,-]+", "_", dataset_name).strip("_")  # npz:/a/b.npz -> npz_a_b.npz


__all__ = [
    "DISCOVERY_RECIPE", "SuperclassError", "SuperclassMap", "cache_name", "cluster_confusion", "confusion_matrix",
    "discovery_arch", "superclasses_for",
]
