"""Data sets by name, held in memory as uint8 tensors and normalised on the fly.

`load_dataset(name)` reads one of:
- `fashion-mnist`: IDX files (raw or .gz) from `data_dir`, `$VMOE_NAS_DATA_DIR`, or where Debian's
  `dataset-fashion-mnist` package puts them;
- `cifar10`, `cifar100`: the python-pickle folders as distributed (cifar100 brings 20 super-classes);
- `imagefolder:PATH`: one folder per class (or `train/` and `test/` holding such folders), PNG/JPEG;
- `imagenet:PATH`: `train/` and `val/` with one folder per synset, streamed from disk (`nas.streaming`), as
  is an image folder given folder options (`image_size`, `stream`, ...) or too big for `max_memory_mb`;
- `npz:PATH`: arrays `x`, `y`, optional `superclass`, `x_test`, `y_test`, `class_names`;
- `synthetic[:key=value,...]`: procedural images with a planted class hierarchy (see `nas.synthetic.make_synthetic`).

The training set is split into train/val by a seeded permutation. The test split is never touched by the
search; only final training evaluates on it.
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nas import streaming
from nas.datasets import DataError, DataFormatError, DataNotFoundError, Dataset, RawArrays, Split
from nas.image_files import IMAGE_SUFFIXES, check_pixels, image_files
from nas.synthetic import load_synthetic

DATA_DIR_ENV = "VMOE_NAS_DATA_DIR"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def load_dataset(name: str, *, data_dir=None, val_fraction: float = 0.1, seed: int = 0, limit: int | None = None,
                 **folder_options) -> Dataset:
    """A data set by name, with a seeded train/val split of its training set; `limit` caps the train split
    (the val split is the same whatever the limit, so accuracies of different budgets compare).
    `folder_options` (`nas.streaming.FolderOptions`: image_size, stream, max_memory_mb, workers, classes,
    per_class, corrupt) apply to image folders."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of training images, got {limit}")
    kind, _, arg = name.partition(":")
    loaders = {"fashion-mnist": _fashion_mnist, "cifar10": _cifar10, "cifar100": _cifar100,
               "imagefolder": _imagefolder, "imagenet": None, "npz": _npz, "synthetic": load_synthetic}
    if kind not in loaders:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(loaders)} "
                        "(imagefolder:PATH, imagenet:PATH, npz:PATH, synthetic[:key=value,...])")
    if kind in ("imagefolder", "imagenet"):
        options = streaming.FolderOptions(**folder_options)
        if kind == "imagenet" or folder_options or streaming.streams_by_default(arg, options.max_memory_mb):
            return streaming.load_folder(name, kind, arg, val_fraction=val_fraction, seed=seed, limit=limit,
                                         options=options)
    elif folder_options:
        raise DataError(f"data.{next(iter(folder_options))} applies to imagefolder:PATH and imagenet:PATH only")
    raw = loaders[kind](arg, data_dir)
    _check_raw(raw, name)
    return _assemble(name, raw, val_fraction, seed, limit)


def _assemble(name: str, raw: RawArrays, val_fraction: float, seed: int, limit: int | None) -> Dataset:
    order = torch.randperm(len(raw.y), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(order) * val_fraction))
    if n_val >= len(order):
        raise DataError(f"{name}: val_fraction={val_fraction} of {len(order)} images leaves none to train on")
    val_index, train_index = order[:n_val], order[n_val:]
    if limit is not None:
        train_index = train_index[:limit]
    images, labels = torch.from_numpy(raw.x), torch.from_numpy(raw.y.astype(np.int64))
    train = Split(images[train_index], labels[train_index])
    pixels = train.images.transpose(0, 1).flatten(1).float() / 255  # (C, N*H*W)
    return Dataset(
        name=name,
        train=train,
        val=Split(images[val_index], labels[val_index]),
        test=Split(torch.from_numpy(raw.x_test), torch.from_numpy(raw.y_test.astype(np.int64))),
        num_classes=len(raw.class_names),
        class_names=tuple(raw.class_names),
        mean=tuple(pixels.mean(1).tolist()),
        std=tuple(pixels.std(1).clamp_min(1e-3).tolist()),  # clamp: a constant channel must not divide by 0
        superclasses=raw.superclasses,
        flip_ok=raw.flip_ok,
    )


def _check_raw(raw: RawArrays, name: str) -> None:
    k = len(raw.class_names)
    for x, y, split in ((raw.x, raw.y, "train"), (raw.x_test, raw.y_test, "test")):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != x.shape[3]:
            raise DataFormatError(f"{name}: {split} images must be uint8 (N, C, S, S), got {x.dtype} {x.shape}")
        if len(x) != len(y) or (len(y) and not 0 <= y.min() <= y.max() < k):
            raise DataFormatError(f"{name}: {split} has {len(x)} images, {len(y)} labels; labels must be in [0, {k})")
    if len(raw.x) < 2:
        raise DataFormatError(f"{name}: needs at least 2 training images, got {len(raw.x)}")
    if raw.x_test.shape[1:] != raw.x.shape[1:] and len(raw.x_test):
        raise DataFormatError(f"{name}: test images are {raw.x_test.shape[1:]}, train images {raw.x.shape[1:]}")
    if raw.superclasses is not None and raw.superclasses.shape != (k,):
        raise DataFormatError(f"{name}: superclass must map each of the {k} classes to a group, "
                              f"got shape {raw.superclasses.shape}")


def _find_dir(name: str, data_dir, subdir: str, marker: str, default: Path | None = None) -> Path:
    """The first candidate folder holding `marker` (or `marker`.gz): data_dir, else $VMOE_NAS_DATA_DIR, else the
    default; each also tried with the distribution's own folder name below it."""
    root = data_dir or os.environ.get(DATA_DIR_ENV)
    roots = [Path(root)] if root else ([default] if default else [])
    candidates = [c for r in roots for c in (r, r / subdir)]
    for candidate in candidates:
        if (candidate / marker).is_file() or (candidate / f"{marker}.gz").is_file():
            return candidate
    looked = ", ".join(map(str, candidates)) or f"nowhere (pass data_dir or set ${DATA_DIR_ENV})"
    raise DataNotFoundError(f"{name}: no data set found; looked in {looked} for {marker}")


# --- Fashion-MNIST --------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (http://yann.lecun.com/exdb/mnist/) of unsigned bytes, raw or gzipped."""
    path = path if path.is_file() else path.with_name(path.name + ".gz")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
        data = bytearray(file.read())  # writable, so torch can share it without a copy
    if len(data) < 4 or bytes(data[:3]) != b"\0\0\x08":
        raise DataFormatError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataFormatError(f"{path}: header says shape {shape} but holds {body.size} values (truncated?)")
    return body.reshape(shape)


def _fashion_mnist(arg: str, data_dir) -> RawArrays:
    folder = _find_dir("fashion-mnist", data_dir, "fashion-mnist", "train-images-idx3-ubyte", FASHION_MNIST_DIR)
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for part, suffix in (("images", "idx3"), ("labels", "idx1")):
            path = folder / f"{prefix}-{part}-{suffix}-ubyte"
            if not path.is_file() and not path.with_name(path.name + ".gz").is_file():
                raise DataNotFoundError(f"fashion-mnist: {folder} lacks {path.name}[.gz]")
            files[split, part] = read_idx(path)
    return RawArrays(files["train", "images"][:, None], files["train", "labels"],
                files["test", "images"][:, None], files["test", "labels"], FASHION_MNIST_CLASSES, flip_ok=True)


# --- CIFAR ----------------------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR's python batches hold (dicts, lists, strings, numpy arrays) and nothing else: a
    pickle may name any function to call, so a crafted file would run code on load."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{module}", name)  # numpy 1 (numpy.core), as in the distributed files, or numpy 2 (_core)
        for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds arrays, lists and strings")
        return super().find_class(module, name)


def _unpickle(path: Path, *keys: bytes) -> dict:
    """A CIFAR pickle: a dict holding at least `keys`."""
    try:
        with open(path, "rb") as file:
            data = _CifarUnpickler(file, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError) as error:
        raise DataFormatError(f"{path}: not a CIFAR python pickle ({error})") from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise DataFormatError(f"{path}: not a CIFAR python pickle (no {missing[0]!r} entry)")
    return data


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch.get(b"data", []), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: expected b'data' of shape (N, 3072), got {data.shape}")
    return data.reshape(-1, 3, 32, 32)


def _cifar10(arg: str, data_dir) -> RawArrays:
    folder = _find_dir("cifar10", data_dir, "cifar-10-batches-py", "data_batch_1")
    train = [_unpickle(folder / f"data_batch_{i}", b"data", b"labels") for i in range(1, 6)]
    test = _unpickle(folder / "test_batch", b"data", b"labels")
    names = [n.decode() for n in _unpickle(folder / "batches.meta", b"label_names")[b"label_names"]]
    return RawArrays(np.concatenate([_cifar_images(b, folder) for b in train]),
                np.concatenate([b[b"labels"] for b in train]).astype(np.int64),
                _cifar_images(test, folder / "test_batch"), np.asarray(test[b"labels"], np.int64),
                tuple(names), flip_ok=True)


def _cifar100(arg: str, data_dir) -> RawArrays:
    folder = _find_dir("cifar100", data_dir, "cifar-100-python", "train")
    keys = (b"data", b"fine_labels", b"coarse_labels")
    train, test = (_unpickle(folder / name, *keys) for name in ("train", "test"))
    meta = _unpickle(folder / "meta", b"fine_label_names")
    fine, coarse = np.asarray(train[b"fine_labels"], np.int64), np.asarray(train[b"coarse_labels"], np.int64)
    superclasses = np.zeros(len(meta[b"fine_label_names"]), np.int64)
    superclasses[fine] = coarse  # every fine class lies in exactly one coarse class
    return RawArrays(_cifar_images(train, folder / "train"), fine, _cifar_images(test, folder / "test"),
                np.asarray(test[b"fine_labels"], np.int64), tuple(n.decode() for n in meta[b"fine_label_names"]),
                superclasses=superclasses, flip_ok=True)


# --- image folders and npz ------------------------------------------------------------------------------


def _imagefolder(arg: str, data_dir) -> RawArrays:
    root = Path(arg)
    split_dirs = (root / "train", root / "test") if (root / "train").is_dir() else (root, None)
    classes = sorted(p.name for p in split_dirs[0].iterdir() if p.is_dir()) if split_dirs[0].is_dir() else []
    if not classes:
        raise DataNotFoundError(f"imagefolder: no class folders in {split_dirs[0]}; expected one folder of "
                                f"PNG/JPEG images per class (optionally under train/ and test/)")
    x, y = _read_images(split_dirs[0], classes, size=None)
    x_test, y_test = (_read_images(split_dirs[1], classes, size=x.shape[-1]) if split_dirs[1]
                      else (np.zeros((0, *x.shape[1:]), np.uint8), np.zeros(0, np.int64)))
    return RawArrays(x, y, x_test, y_test, tuple(classes))


def _read_images(folder: Path, classes: list[str], size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """All images under folder/<class>/, resized to the first one's size (which must be square); grey if all
    are, else RGB. Each file is read and closed in turn: a folder may hold more images than a process may open
    files, and only the resized pixels are kept."""
    paths = [(folder / name / file, c) for c, name in enumerate(classes) if (folder / name).is_dir()
             for file in image_files(folder / name)]
    if not paths:
        raise DataNotFoundError(f"imagefolder: no {'/'.join(IMAGE_SUFFIXES)} files in the class folders of {folder}")
    arrays = []
    for index, (path, _) in enumerate(paths):
        try:
            with Image.open(path) as image:
                check_pixels(path, image)
                if index == 0 and image.width != image.height:
                    raise DataFormatError(f"imagefolder: images must be square, {path} is {image.size}")
                size = size or image.width
                grey = image.mode in ("L", "1", "I;16")
                arrays.append(np.asarray(image.convert("L" if grey else "RGB").resize((size, size)), np.uint8))
        except (OSError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
            raise DataFormatError(f"imagefolder: cannot read {path} ({error})") from None
    if any(a.ndim == 3 for a in arrays):  # one colour image makes them all RGB: grey repeated on 3 channels
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1) for a in arrays]
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, C, S, S)
    return x, np.array([c for _, c in paths], np.int64)


def _npz(arg: str, data_dir) -> RawArrays:
    path = Path(arg)
    if not path.is_file():
        raise DataNotFoundError(f"npz: no file at {path}; expected an .npz with arrays x, y (optional superclass)")
    try:
        arrays = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as error:
        raise DataFormatError(f"npz: {path} is not a readable .npz ({error})") from None
    missing = {"x", "y"} - set(arrays)
    if missing:
        raise DataFormatError(f"npz: {path} lacks array(s) {', '.join(sorted(missing))}; has {', '.join(arrays)}")
    y = arrays["y"].astype(np.int64)
    num_classes = int(y.max()) + 1
    names = arrays.get("class_names")
    names = tuple(map(str, names)) if names is not None else tuple(str(c) for c in range(num_classes))
    x_test = arrays.get("x_test", arrays["x"][:0])
    superclass = arrays.get("superclass")
    return RawArrays(_nchw(arrays["x"], path), y, _nchw(x_test, path), arrays.get("y_test", y[:0]).astype(np.int64),
                names, superclasses=None if superclass is None else superclass.astype(np.int64))


def _nchw(x: np.ndarray, path: Path) -> np.ndarray:
    """(N, S, S), (N, S, S, C) or (N, C, S, S) -> (N, C, S, S) uint8."""
    if x.dtype != np.uint8:
        raise DataFormatError(f"npz: {path}: x must be uint8 pixels, got {x.dtype}")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


__all__ = [
    "DATA_DIR_ENV", "load_dataset", "read_idx",
]
