"""Procedural data sets (`synthetic[:key=value,...]`): images with a planted class hierarchy, a planted
specialisation or a planted demand for capacity, generated from a seed (see `make_synthetic`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from nas.datasets import DataError, RawArrays

SYNTHETIC_DEFAULTS = dict(size=16, channels=1, classes=12, groups=4, train=6000, test=1000, seed=0, mode="hierarchy",
                          bins=96)
SYNTHETIC_MODES = ("hierarchy", "specialised", "lookup")
CUE_KINDS = ("frequency", "orientation", "position", "size")  # mode=specialised: group g's classes differ by kind g


def make_synthetic(*, size=16, channels=1, classes=12, groups=4, train=6000, test=1000, seed=0,
                   mode="hierarchy", bins=96) -> RawArrays:
    """Images with a planted two-level hierarchy: each super-class has a smooth coarse pattern that all its
    classes share, and each class adds a fainter pattern of its own; per-image smooth noise of the fine
    pattern's strength, pixel noise and contrast jitter on top. The super-class is easy to see (a router
    learns it fast); the class within it is harder, so classes of one super-class are confused with each
    other, which is what super-class discovery looks for.

    `mode="specialised"` plants specialisation instead: the super-class is still told by its coarse pattern,
    but within super-class g the classes differ by a cue of g's own kind (`CUE_KINDS[g]`): the frequency of
    a grating at a random orientation and phase, the orientation of a grating of random frequency and phase,
    the position of a blob, or the size of a blob at a random place. Each cue needs its own invariant
    features, so a dense MLP of fixed width must hold all of them where each expert of a per-image MoE
    routed by super-class holds one.

    `mode="lookup"` plants a demand for capacity that each super-class makes on its own: the image shows its
    super-class's coarse pattern and, in its top-left quarter, a grey level v in [0, 1); the class is
    `table[g][floor(bins * v + g / groups)]`, a random table per super-class, its bins shifted by 1/groups of
    a bin from one super-class to the next, so no two super-classes share a bin boundary. A dense MLP must
    hold every super-class's table (groups x bins boundaries), an expert routed by super-class one table."""
    if mode == "specialised":
        return _specialised(size, channels, classes, groups, train, test, np.random.default_rng(seed))
    if mode == "lookup":
        return _lookup(size, channels, classes, groups, train, test, bins, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    group_of = rng.permutation(np.arange(classes) * groups // classes)  # shuffled: groups are not index blocks
    templates = _group_patterns(rng, groups, channels, size)[group_of]  # (classes, C, S, S)
    templates += 0.5 * _smooth(rng.normal(size=(classes, channels, 4, 4)), size)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        contrast = rng.uniform(0.7, 1.3, (n, 1, 1, 1))
        nuisance = 0.35 * _smooth(rng.normal(size=(n, channels, 4, 4)), size)
        x = contrast * templates[y] + nuisance + 0.3 * rng.normal(size=(n, channels, size, size))
        return np.clip(128 + 50 * x, 0, 255).astype(np.uint8), y

    x, y = sample(train)
    x_test, y_test = sample(test)
    names = tuple(f"g{group_of[c]}-c{c}" for c in range(classes))
    return RawArrays(x, y, x_test, y_test, names, superclasses=group_of.astype(np.int64), flip_ok=False)


def _group_patterns(rng: np.random.Generator, groups: int, channels: int, size: int) -> np.ndarray:
    """(groups, C, S, S): smooth coarse patterns, orthogonal while 3x3xC allows, unit std."""
    coarse = rng.normal(size=(max(groups, 9 * channels), 9 * channels))
    coarse = np.linalg.qr(coarse.T)[0].T[:groups] if groups <= 9 * channels else coarse[:groups]
    return _smooth(coarse.reshape(groups, channels, 3, 3), size)


def _specialised(size: int, channels: int, classes: int, groups: int, train: int, test: int,
                 rng: np.random.Generator) -> RawArrays:
    group_of = rng.permutation(np.arange(classes) * groups // classes)
    rank = np.array([(group_of[:c] == group_of[c]).sum() for c in range(classes)])  # class's index in its group
    per_group = np.bincount(group_of, minlength=groups)
    patterns = _group_patterns(rng, groups, channels, size)
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size  # pixel centres in [0, 1]

    def cue(kind: str, value: np.ndarray, n: int) -> np.ndarray:
        """(n, S, S) unit-scale images of one cue kind; `value` in [0, 1) picks the class's setting."""
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        if kind in ("frequency", "orientation"):
            if kind == "frequency":  # 1.5 to size/4 cycles per image, at any orientation
                cycles, angle = 1.5 + value * (size / 4 - 1.5), rng.uniform(0, np.pi, n)
            else:  # evenly spread over half a turn, at 2-3 cycles per image
                cycles, angle = rng.uniform(2, 3, n), np.pi * value
            along = xx * np.cos(angle)[:, None, None] + yy * np.sin(angle)[:, None, None]
            return np.cos(2 * np.pi * cycles[:, None, None] * along + phase)
        if kind == "position":  # on a ring around the centre, jittered
            centre = 0.5 + 0.28 * np.stack([np.cos(2 * np.pi * value), np.sin(2 * np.pi * value)], -1)
            centre = centre + rng.normal(0, 0.03, (n, 2))
            radius = np.full(n, 0.12)
        else:  # size: radius 0.07 to 0.3 of the image, anywhere it fits
            radius = 0.07 + value * 0.23
            centre = rng.uniform(radius[:, None], 1 - radius[:, None], (n, 2))
        dist2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
        return 2 * np.exp(-dist2 / (2 * (radius[:, None, None] / 2) ** 2)) - 0.5

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        fine = np.zeros((n, size, size))
        for g in range(groups):
            mine = np.flatnonzero(group_of[y] == g)
            fine[mine] = cue(CUE_KINDS[g], rank[y[mine]] / per_group[g], len(mine))
        contrast = rng.uniform(0.7, 1.3, (n, 1, 1, 1))
        x = contrast * (patterns[group_of[y]] + fine[:, None]) + 0.3 * rng.normal(size=(n, channels, size, size))
        return np.clip(128 + 40 * x, 0, 255).astype(np.uint8), y

    x, y = sample(train)
    x_test, y_test = sample(test)
    names = tuple(f"g{group_of[c]}-{CUE_KINDS[group_of[c]]}{rank[c]}" for c in range(classes))
    return RawArrays(x, y, x_test, y_test, names, superclasses=group_of.astype(np.int64), flip_ok=False)


def _lookup(size: int, channels: int, classes: int, groups: int, train: int, test: int, bins: int,
            rng: np.random.Generator) -> RawArrays:
    group_of = np.arange(classes) * groups // classes  # classes of a group are consecutive: tables index them
    first = np.searchsorted(group_of, np.arange(groups))
    per_group = np.bincount(group_of, minlength=groups)
    patterns = _group_patterns(rng, groups, channels, size)
    table = first[:, None] + rng.integers(0, per_group[:, None], (groups, bins + 1))  # (groups, bins + 1) -> class
    half = size // 2

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        g = rng.integers(0, groups, n)
        level = rng.uniform(0, 1, n)
        x = patterns[g]
        x[:, :, :half, :half] = 2.5 * (2 * level - 1)[:, None, None, None]  # 28 to 228 in pixels, ~2 per bin
        x = x + 0.05 * rng.normal(size=x.shape)
        return np.clip(128 + 40 * x, 0, 255).astype(np.uint8), table[g, np.floor(bins * level + g / groups).astype(int)]

    x, y = sample(train)
    x_test, y_test = sample(test)
    names = tuple(f"g{group_of[c]}-lookup{c - first[group_of[c]]}" for c in range(classes))
    return RawArrays(x, y, x_test, y_test, names, superclasses=group_of.astype(np.int64), flip_ok=False)


def _smooth(noise: np.ndarray, size: int) -> np.ndarray:
    """(n, C, h, w) noise -> (n, C, size, size), bilinearly upsampled, unit std per pattern."""
    up = torch.nn.functional.interpolate(torch.from_numpy(noise).float(), size=(size, size), mode="bilinear")
    up = up - up.mean(dim=(1, 2, 3), keepdim=True)
    return (up / up.std(dim=(1, 2, 3), keepdim=True)).numpy()


def load_synthetic(arg: str, data_dir) -> RawArrays:
    options, given = dict(SYNTHETIC_DEFAULTS), set()
    for item in filter(None, arg.split(",")):
        key, _, value = item.partition("=")
        given.add(key)
        if key == "mode" and value in SYNTHETIC_MODES:
            options[key] = value
        elif key in options and key != "mode" and value.isdigit():
            options[key] = int(value)
        else:
            raise DataError(f"synthetic: bad option {item!r}; expected key=integer with key in "
                            f"{', '.join(k for k in options if k != 'mode')}, or mode={'|'.join(SYNTHETIC_MODES)}")
    if not 1 <= options["groups"] <= options["classes"] or options["size"] < 4 or options["bins"] < 1:
        raise DataError(f"synthetic: need 1 <= groups <= classes, size >= 4 and bins >= 1, got {options}")
    if options["mode"] == "specialised" and options["groups"] > len(CUE_KINDS):
        raise DataError(f"synthetic: mode=specialised has {len(CUE_KINDS)} cue kinds ({', '.join(CUE_KINDS)}), "
                        f"one per group, so groups must be <= {len(CUE_KINDS)}, got {options['groups']}")
    if options["mode"] != "lookup" and "bins" in given:
        raise DataError(f"synthetic: bins is an option of mode=lookup, not of mode={options['mode']}")
    pixels = (options["train"] + options["test"]) * options["channels"] * options["size"] ** 2
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 8 * pixels > memory:  # torch, unlike numpy, fails on a huge request with a bare RuntimeError
        raise DataError(f"synthetic: {arg!r} needs {8 * pixels / 2**30:.3g} GiB to generate (8 bytes a pixel), more "
                        f"than this machine's {memory / 2**30:.3g} GiB")
    try:
        return make_synthetic(**options)
    except MemoryError as error:  # numpy refuses a huge request up front: train, test, size or bins too large
        raise DataError(f"synthetic: {arg!r} does not fit in memory ({error})") from None


__all__ = ["CUE_KINDS", "SYNTHETIC_DEFAULTS", "SYNTHETIC_MODES", "load_synthetic", "make_synthetic"]
