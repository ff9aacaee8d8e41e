"""Small generated image folders for the streaming tests: JPEGs of mixed sizes whose class is a colour."""

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200), (200, 40, 200)]


def write_jpegs(folder: Path, classes: int = 4, per_class: int = 25, *, seed: int = 0, sizes=(64, 96),
                suffix: str = ".jpg") -> Path:
    """`classes` folders of `per_class` images each, sides drawn from `sizes`, tinted by class plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(sizes[0], sizes[1] + 1, 2)
            pixels = np.clip(np.array(COLOURS[c % len(COLOURS)]) + rng.normal(0, 40, (h, w, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"class{c}" / f"{i:04d}{suffix}", quality=90)
    return folder


def write_corrupt(folder: Path) -> list[Path]:
    """Two unreadable images in the first class: garbage bytes, and a JPEG cut after its header."""
    garbage = folder / "class0" / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 10)
    good = next(p for p in sorted((folder / "class0").iterdir()) if p.name != "garbage.jpg")
    truncated = folder / "class0" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    return [garbage, truncated]


def write_png_bomb(path: Path, side: int = 20000) -> Path:
    """A greyscale PNG of side x side black pixels: some 400 KB on disk, side**2 bytes decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compress, row, body = zlib.compressobj(9), b"\0" * (side + 1), []  # each row: filter byte, then pixels
    body += [compress.compress(row) for _ in range(side)]
    body.append(compress.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body))
                     + chunk(b"IEND", b""))
    return path
