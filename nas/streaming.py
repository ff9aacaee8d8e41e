"""Image folders and the ImageNet layout at any size: decoded from disk by DataLoader worker processes as
training goes, or decoded once into memory when they fit a memory budget.

- `imagenet:PATH`: `train/` and `val/`, one folder per synset in each; an optional class-index file
  (`imagenet_class_index.json` as Keras ships it, or `LOC_synset_mapping.txt` / `synsets.txt` lines
  `WNID name`) names the classes and fixes their order. `val/` is the test split; the search's val split is
  a seeded part of `train/`, as for every data set.
- `imagefolder:PATH`: one folder per class, or `train/` and `test/` holding them.

Every image is decoded by torchvision (`torchvision.io.decode_image`) and brought to a fixed `image_size`:
evaluation resizes the shorter side to size / 0.875 and takes the centre crop (timm's default crop); training
with augmentation takes a random-resized crop, a flip and RandAugment (torchvision's transforms v2, on the
decoded uint8 tensor: no PIL round trip, and uint8 crosses the worker pipe, a quarter of float32). A split
that streams has no image tensor; the trainer asks it for batches by step (`StreamedSplit.batches`) and for
evaluation chunks (`StreamedSplit.chunks`). Each sample's random transform is seeded by (seed, step,
position), so a batch depends only on those, as the in-memory batches do.

File lists are numpy arrays (class folder index, file name): forked workers then share them without the
copy-on-write growth of Python lists, and no file stays open beyond its own decode.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nas.config import MAX_NUMBER, ConfigError, check_int, check_number, first_line
from nas.datasets import DataError, DataFormatError, DataNotFoundError, Dataset, Split
from nas.devices import available_cores
from nas.image_files import IMAGE_SUFFIXES, check_pixels, image_files

log = logging.getLogger("vmoe_nas.data")

CROP_PCT = 0.875  # timm's DEFAULT_CROP_PCT: eval resizes to size / 0.875, then centre-crops
STATS_SAMPLE = 256  # train images whose pixels give the normalisation: the same rule in memory and streaming
INDEX_FILES = ("imagenet_class_index.json", "LOC_synset_mapping.txt", "synsets.txt")
CORRUPT_CHOICES = ("skip", "error")
UNREADABLE = (RuntimeError, OSError, ValueError)  # what decoding a bad file raises (torchvision: RuntimeError)
EVAL_CHUNK = 256  # images per decoded chunk when reading a split in order: bounds what workers hold ready
MANY_FILES = 1000  # from here on an image folder is read here whatever its options: a default ulimit is 1024


FOLDER_FIELDS = ("image_size", "stream", "max_memory_mb", "workers", "classes", "per_class", "corrupt")


@dataclass(frozen=True)
class FolderOptions:
    """The data section's fields for image folders (`data.image_size`, `data.stream`, ...)."""

    image_size: int | None = None  # None: the first training image's shorter side (224 for imagenet)
    stream: str | bool = "auto"  # auto: stream when the decoded train split would exceed max_memory_mb
    max_memory_mb: float = 4096  # uint8 pixels of train + val held in memory at most
    workers: int | None = None  # decoding processes; None: from the cores (0 decodes in the training process)
    classes: int | None = None  # a seeded subset of the classes, for proxies
    per_class: int | None = None  # a seeded subset of each class's training images
    corrupt: str = "skip"  # skip: count unreadable images in the log; error: stop on the first

    def __post_init__(self):
        for name in ("image_size", "classes", "per_class"):
            check_int(f"data.{name}", getattr(self, name), 1 if name != "image_size" else 4, MAX_NUMBER, optional=True)
        check_int("data.workers", self.workers, 0, 256, optional=True)
        if not (self.stream == "auto" or isinstance(self.stream, bool)):
            raise ConfigError("data.stream", f"must be auto, true or false, got {self.stream!r}")
        check_number("data.max_memory_mb", self.max_memory_mb, positive=True, maximum=2**40)
        if self.corrupt not in CORRUPT_CHOICES:
            raise ConfigError("data.corrupt", f"must be skip or error, got {self.corrupt!r}")

    def decode_workers(self) -> int:
        return min(8, available_cores() - 1) if self.workers is None else self.workers


# --- files --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    """Image files as arrays: file i is root/folders[label[i]]/names[i]."""

    root: str
    folders: tuple[str, ...]
    names: np.ndarray  # bytes, one per file
    labels: np.ndarray  # int64

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.folders[self.labels[i]], self.names[i].decode())

    def take(self, index) -> Files:
        return Files(self.root, self.folders, self.names[index], self.labels[index])

    def __len__(self) -> int:
        return len(self.labels)


def list_files(folder: Path, classes: tuple[str, ...]) -> Files:
    """The images of each class folder under `folder`, sorted; scandir keeps no file open."""
    names, labels = [], []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        found = image_files(folder / name)
        names += found
        labels += [label] * len(found)
    if not names:
        raise DataNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} files in the class folders of {folder}")
    return Files(str(folder), classes, np.array([n.encode() for n in names]), np.array(labels, np.int64))


def layout(kind: str, root: Path) -> tuple[Path, Path | None, tuple[str, ...], tuple[str, ...]]:
    """(train folder, test folder or None, class folders in label order, class names) of a data set root;
    one DataError for a missing folder, no classes, or class folders that differ between the splits."""
    if not root.is_dir():
        raise DataNotFoundError(f"{kind}: no folder at {root}; expected one folder of images per class"
                                f"{' in train/ and val/' if kind == 'imagenet' else ''}")
    if kind == "imagenet":
        train, test = root / "train", root / "val"
        for folder in (train, test):
            if not folder.is_dir():
                raise DataNotFoundError(f"imagenet: {root} lacks {folder.name}/; expected train/ and val/ with one "
                                        "folder per synset")
    else:
        train, test = (root / "train", root / "test") if (root / "train").is_dir() else (root, None)
        test = test if test and test.is_dir() else None
    folders = _subfolders(train)
    if not folders:
        raise DataNotFoundError(f"{kind}: no class folders in {train}; expected one folder of images per class")
    if test is not None and _subfolders(test) != folders:
        extra, missing = sorted(set(_subfolders(test)) - set(folders)), sorted(set(folders) - set(_subfolders(test)))
        raise DataFormatError(f"{kind}: class folders of {test} differ from {train}: "
                              f"{len(missing)} missing ({', '.join(missing[:3])}), {len(extra)} extra "
                              f"({', '.join(extra[:3])})")
    names = folders
    index = next((root / f for f in INDEX_FILES if (root / f).is_file()), None)
    if index is not None:
        folders, names = _read_index(index, set(folders))
    return train, test, tuple(folders), tuple(names)


def _subfolders(folder: Path) -> list[str]:
    found = []
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                if entry.is_dir():
                    found.append(entry.name)
            except OSError as error:  # a link that loops
                raise DataFormatError(f"cannot read {entry.path} ({error.strerror})") from None
    return sorted(found)


def _read_index(path: Path, present: set[str]) -> tuple[list[str], list[str]]:
    """(folders, names) in the class-index file's order; it must name exactly the class folders present."""
    try:
        if path.suffix == ".json":
            entries = json.loads(path.read_text())
            pairs = [tuple(entries[str(i)][:2]) for i in range(len(entries))]
        else:
            pairs = [tuple(line.split(maxsplit=1) + [""])[:2] for line in path.read_text().splitlines() if line.strip()]
            pairs = [(wnid, name or wnid) for wnid, name in pairs]
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise DataFormatError(f"class index {path} is malformed ({error})") from None
    listed = {wnid for wnid, _ in pairs}
    if len(listed) != len(pairs):  # its images would get two labels
        twice = next(wnid for i, (wnid, _) in enumerate(pairs) if wnid in {w for w, _ in pairs[:i]})
        raise DataFormatError(f"class index {path} lists {twice} more than once")
    if listed != present:
        raise DataFormatError(f"class index {path} lists {len(listed)} classes, the folders hold {len(present)}; "
                              f"{len(listed ^ present)} differ (e.g. {sorted(listed ^ present)[0]})")
    return [w for w, _ in pairs], [n for _, n in pairs]


def subset(files: Files, classes: int | None, per_class: int | None, seed: int) -> tuple[Files, np.ndarray]:
    """A seeded subset for proxies: `classes` classes drawn by SeedSequence(seed), relabelled 0..n-1 in their
    original order, and of each the first `per_class` files of a seeded permutation. Returns the files and
    the chosen original class indices."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    k = len(files.folders)
    if classes is not None and classes > k:
        raise DataError(f"data.classes is {classes} but the data set has {k} classes")
    chosen = np.sort(rng.choice(k, classes, replace=False)) if classes else np.arange(k)
    keep = np.flatnonzero(np.isin(files.labels, chosen))
    if per_class:
        keep = np.concatenate([rng.permutation(keep[files.labels[keep] == c])[:per_class] for c in chosen])
        keep.sort()
    relabel = np.full(k, -1, np.int64)
    relabel[chosen] = np.arange(len(chosen))
    return Files(files.root, tuple(files.folders[c] for c in chosen), files.names[keep],
                 relabel[files.labels[keep]]), chosen


# --- decoding and transforms ---------------------------------------------------------------------------------


def decode(path: str, channels: int | None = None) -> torch.Tensor:
    """(C, H, W) uint8 of the image file; grey or RGB as asked (CMYK and palette images converted), as stored
    when `channels` is None. Its header is read first: an image of more than MAX_IMAGE_PIXELS is refused, as
    the in-memory reader refuses it."""
    from torchvision.io import ImageReadMode, decode_image  # deferred: torchvision takes seconds to import

    try:
        with Image.open(path) as image:
            check_pixels(path, image)
    except Image.DecompressionBombError as error:  # PIL's own check, at twice MAX_IMAGE_PIXELS
        raise DataFormatError(f"cannot read {path} ({error})") from None
    mode = {None: ImageReadMode.UNCHANGED, 1: ImageReadMode.GRAY}.get(channels, ImageReadMode.RGB)
    return decode_image(path, mode=mode)


def eval_transform(size: int):
    from torchvision.transforms import v2  # deferred: torchvision takes seconds to import

    return v2.Compose([v2.Resize(math.floor(size / CROP_PCT), antialias=True), v2.CenterCrop(size)])


def train_transform(size: int, *, flip: bool):
    """The standard ImageNet train transform on uint8 tensors: random-resized crop, flip, RandAugment (2 ops at
    magnitude 9, timm's rand-m9-n2)."""
    from torchvision.transforms import v2  # deferred: torchvision takes seconds to import

    return v2.Compose([v2.RandomResizedCrop(size, antialias=True),
                       v2.RandomHorizontalFlip() if flip else v2.Identity(), v2.RandAugment(num_ops=2, magnitude=9)])


class FileImages(torch.utils.data.Dataset):
    """Sample (file index, seed or None) -> (uint8 image, label), or (None, why) for an unreadable file."""

    def __init__(self, files: Files, channels: int, size: int, train_tf=None):
        self.files, self.channels = files, channels
        self.eval_tf, self.train_tf = eval_transform(size), train_tf

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.files.path(index)
        try:
            image = decode(path, self.channels)
        except UNREADABLE as error:
            return None, (path, _reason(error))
        if seed is None or self.train_tf is None:
            return self.eval_tf(image), int(self.files.labels[index])
        with torch.random.fork_rng(devices=[]):  # v2 transforms draw from torch's RNG: seed it per sample
            torch.manual_seed(seed)
            return self.train_tf(image), int(self.files.labels[index])


def _reason(error: Exception) -> str:
    """torchvision's message without its source location ('decode_jpeg, .../decode_jpeg.cpp:171, Image is ...')."""
    if isinstance(error, DataFormatError):  # says the file already
        return str(error).split(" (", 1)[-1].removesuffix(")")
    text = first_line(error)
    return re.sub(r"^\w+, \S+:\d+, ", "", text)


def _collate(samples):
    """(images, labels, unreadable files' reasons) of a batch, without its unreadable images."""
    good = [s for s in samples if s[0] is not None]
    bad = [s[1] for s in samples if s[0] is None]
    if not good:
        return None, None, bad
    return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good]), bad


def _sample_seed(seed: int, step: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, step, position]).generate_state(1)[0])


class StreamedSplit:
    """A split read from disk by `workers` processes; unreadable images skipped and counted (or an error)."""

    def __init__(self, files: Files, channels: int, size: int, *, workers: int, corrupt: str, flip: bool):
        self.files, self.channels, self.size = files, channels, size
        self.workers, self.corrupt, self.flip = workers, corrupt, flip
        self.unreadable: set[str] = set()  # files skipped so far; each is logged once

    def __len__(self) -> int:
        return len(self.files)

    def _loader(self, keys, dataset: FileImages, pin: bool):
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=keys, num_workers=self.workers, collate_fn=_collate, pin_memory=pin,
            prefetch_factor=2 if self.workers else None)  # batches ready per worker: 2 x 256 x 150 kB at 224 px

    def _checked(self, batches):
        for images, labels, bad in batches:
            for path, why in bad:
                if self.corrupt == "error":
                    raise DataFormatError(f"cannot read {path} ({why}); set data.corrupt: skip to skip such files")
                if path not in self.unreadable:
                    self.unreadable.add(path)
                    log.warning("skipped unreadable image %s (%s); %d of %d images of this split skipped",
                                path, why, len(self.unreadable), len(self))
            if images is not None:
                yield images, labels

    def batches(self, order, start: int, *, seed: int, augment: bool, pin: bool = False):
        """(uint8 images, labels) of steps start, start+1, ...: step s holds files order(s), each transformed
        with the seed (seed, s, position) when augmenting."""

        def keys() -> Iterator[list]:
            for step in range(start, 2**62):
                yield [(int(i), _sample_seed(seed, step, p) if augment else None) for p, i in enumerate(order(step))]

        train_tf = train_transform(self.size, flip=self.flip) if augment else None
        yield from self._checked(self._loader(keys(), FileImages(self.files, self.channels, self.size, train_tf), pin))

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) in file order, eval transform, at most `size` (and EVAL_CHUNK) at a time."""
        size = min(size, EVAL_CHUNK)
        keys = [list(range(s, min(s + size, len(self)))) for s in range(0, len(self), size)]
        yield from self._checked(self._loader(keys, FileImages(self.files, self.channels, self.size), False))


# --- the data set --------------------------------------------------------------------------------------------


def load_folder(name: str, kind: str, path: str, *, val_fraction: float, seed: int, limit: int | None,
                options: FolderOptions) -> Dataset:
    """An image folder or ImageNet-layout data set, streamed or in memory by `options.stream`."""
    train_dir, test_dir, folders, class_names = layout(kind, Path(path))
    files = list_files(train_dir, folders)
    files, chosen = subset(files, options.classes, options.per_class, seed)
    class_names = tuple(class_names[c] for c in chosen)
    if options.classes or options.per_class:
        log.info("%s: subset of %d classes, %s images each (data.seed %d): %s", name, len(chosen),
                 options.per_class or "all", seed, ", ".join(folders[c] for c in chosen))
    test = list_files(test_dir, folders) if test_dir else None
    if test is not None and options.classes:
        test = subset(test, options.classes, None, seed)[0]
    first = _first_readable(files, options.corrupt)
    channels = 1 if first.shape[0] <= 2 else 3  # grey (with alpha) stays grey; RGBA and CMYK become RGB
    size = options.image_size or (224 if kind == "imagenet" else min(first.shape[1:]))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(order) * val_fraction))
    if n_val >= len(order):
        raise DataError(f"{name}: val_fraction={val_fraction} of {len(order)} images leaves none to train on")
    val_index, train_index = order[:n_val].numpy(), order[n_val:].numpy()
    if limit is not None:
        train_index = train_index[:limit]
    workers = options.decode_workers()
    flip = kind == "imagenet"  # photographs; a folder may hold digits or text, as imagefolder: always assumed
    resident_mb = (len(train_index) + n_val) * channels * size * size / 2**20
    streams = options.stream is True or (options.stream == "auto" and resident_mb > options.max_memory_mb)
    log.info("%s: %d train, %d val images at %d px (%.0f MB decoded): %s", name, len(train_index), n_val, size,
             resident_mb, "streaming" if streams else "in memory")

    def split(part: Files | None) -> Split:
        if part is None:
            return Split(torch.zeros(0, channels, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
        streamed = StreamedSplit(part, channels, size, workers=workers, corrupt=options.corrupt, flip=flip)
        if streams:
            return Split(torch.zeros(0, channels, size, size, dtype=torch.uint8), torch.from_numpy(part.labels),
                         stream=streamed)
        images = torch.empty(len(part), channels, size, size, dtype=torch.uint8)  # filled in place: no 2x peak
        labels, filled = torch.empty(len(part), dtype=torch.int64), 0
        for chunk, chunk_labels in streamed.chunks(256):
            images[filled : filled + len(chunk)], labels[filled : filled + len(chunk)] = chunk, chunk_labels
            filled += len(chunk)
        return Split(images[:filled].clone() if filled < len(part) else images, labels[:filled])

    train = split(files.take(train_index))
    mean, std = _pixel_stats(files.take(train_index), channels, size, seed, workers, options.corrupt)
    return Dataset(name=name, train=train, val=split(files.take(val_index)), test=split(test),
                   num_classes=len(class_names), class_names=class_names, mean=mean, std=std, superclasses=None,
                   flip_ok=flip)


def _first_readable(files: Files, corrupt: str) -> torch.Tensor:
    """The first readable training image as stored (its channels say grey or colour)."""
    for i in range(len(files)):
        try:
            return decode(files.path(i))
        except UNREADABLE as error:
            if corrupt == "error":
                raise DataFormatError(f"cannot read {files.path(i)} ({_reason(error)})") from None
    raise DataFormatError(f"none of the {len(files)} images under {files.root} can be read")


def _pixel_stats(files: Files, channels: int, size: int, seed: int, workers: int, corrupt: str):
    """Per-channel mean and std on the [0, 1] scale of a seeded sample of STATS_SAMPLE train images."""
    rng = np.random.default_rng(seed)
    sample = files.take(np.sort(rng.permutation(len(files))[:STATS_SAMPLE]))
    split = StreamedSplit(sample, channels, size, workers=min(workers, 2), corrupt=corrupt, flip=False)
    pixels = torch.cat([images for images, _ in split.chunks(64)]).transpose(0, 1).flatten(1).float() / 255
    return tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-3).tolist())


def streams_by_default(path: str, max_memory_mb: float) -> bool:
    """Whether an image folder given no folder options is read here rather than by `nas.data`'s in-memory
    reader: when it has MANY_FILES or more (that reader holds each file open until all are read) or would
    exceed `max_memory_mb` in memory at its first image's size."""
    train_dir, _, folders, _ = layout("imagefolder", Path(path))
    files = list_files(train_dir, folders)
    try:
        with Image.open(files.path(0)) as image:  # reads the header only
            side, channels = min(image.size), 1 if image.mode in ("L", "1", "I;16") else 3
    except (OSError, Image.DecompressionBombError) as error:
        raise DataFormatError(f"cannot read {files.path(0)} ({error})") from None
    return len(files) >= MANY_FILES or len(files) * channels * side * side / 2**20 > max_memory_mb


__all__ = ["FOLDER_FIELDS", "FolderOptions", "Files", "StreamedSplit", "layout", "list_files", "load_folder", "subset"]
