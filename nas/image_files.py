"""Image files on disk, for both image-folder readers (in memory: `nas.data`; streamed: `nas.streaming`): which
entries of a folder are images, and the pixel limit checked before anything is decoded.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from nas.datasets import DataFormatError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_IMAGE_PIXELS = 89_478_485  # PIL's decompression-bomb limit, for both image-folder readers: 256 MiB as RGB
log = logging.getLogger("vmoe_nas.data")


def image_files(folder: Path) -> list[str]:
    """The names of the image files in `folder`, sorted. Entries named like images that are not regular files
    (a FIFO, whose read blocks forever; a device, a folder) are skipped and counted in the log; a link that
    loops or dangles is a DataFormatError naming it."""
    names, skipped = [], 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            try:
                mode = entry.stat().st_mode  # through links
            except OSError as error:
                raise DataFormatError(f"cannot read {entry.path} ({error.strerror})") from None
            if stat.S_ISREG(mode):
                names.append(entry.name)
            else:
                skipped += 1
    if skipped:
        log.warning("skipped %d entries of %s named like images that are not regular files", skipped, folder)
    return sorted(names)


def check_pixels(path: str | Path, image) -> None:
    """A DataFormatError if the opened PIL `image` (its header read, nothing decoded) has more pixels than
    MAX_IMAGE_PIXELS: a 389 KB PNG can decode to 20000 x 20000."""
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise DataFormatError(f"cannot read {path} ({image.width} x {image.height} pixels, more than "
                              f"MAX_IMAGE_PIXELS={MAX_IMAGE_PIXELS:,}: a decompression bomb?)")


__all__ = ["IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "check_pixels", "image_files"]
