"""The `Slide` interface shared by every backend, and `open_slide`, which picks the backend.

Backends implement `_read_level_region`; everything physical (mpp, best level, thumbnails,
reading at a target resolution) lives here once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from pathvlm.errors import SlideError

log = logging.getLogger(__name__)

# plain images above this many pixels are refused before decoding (decompression bombs)
DEFAULT_MAX_PIXELS = 100_000_000

# a level counts as "not coarser than the target" within this relative tolerance, so the
# 2.0003x level of a real pyramid serves a 2.0x request
_LEVEL_TOLERANCE = 1e-3

_RESAMPLE = Image.Resampling.LANCZOS

# levels above this many pixels are read in strips when making a thumbnail
THUMBNAIL_CHUNK_PIXELS = 64_000_000


class Slide:
    """One whole-slide image or plain image, read through a backend.

    Attributes:
        path: the file path.
        name: the file stem.
        dimensions: (w, h) at level 0.
        level_count, level_dimensions, level_downsamples: the pyramid.
        mpp: (x, y) micrometres per level-0 pixel, or None when unknown.
        objective_power: scanner objective (e.g. 20.0) or None.
        vendor: backend-reported format ("aperio", "generic-tiff", "dicom", "image", ...).
        properties: string metadata; never anything about associated images.
    """

    backend = "base"

    def __init__(
        self,
        path: str | Path,
        level_dimensions: list[tuple[int, int]],
        level_downsamples: list[float],
        mpp: tuple[float, float] | None,
        objective_power: float | None,
        vendor: str,
        properties: dict[str, str],
    ):
        self.path = Path(path)
        self.name = self.path.stem
        self.level_dimensions = [(int(w), int(h)) for w, h in level_dimensions]
        self.level_downsamples = [float(d) for d in level_downsamples]
        self.level_count = len(self.level_dimensions)
        self.dimensions = self.level_dimensions[0]
        self.mpp = mpp
        self.objective_power = objective_power
        self.vendor = vendor
        self.properties = properties

    # ---------------------------------------------------------------- backend hook
    def _read_level_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file handle (idempotent)."""

    def __enter__(self) -> Slide:  # noqa: PYI034 (no typing_extensions dependency for Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.dimensions}, levels={self.level_count}, mpp={self.mpp})"

    # ---------------------------------------------------------------- reading
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """Read `size` (w, h) pixels of `level` whose top-left is `location` in level-0 pixels.

        Returns:
            PIL RGB image of exactly `size`; areas outside the slide are white.
        """
        if not 0 <= level < self.level_count:
            raise SlideError(
                self.path, f"level {level} does not exist (levels 0..{self.level_count - 1})"
            )
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise SlideError(self.path, f"region size must be positive, got {size}")
        return self._read_level_region((int(location[0]), int(location[1])), level, (w, h))

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (never upsample
        when a finer level exists)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + _LEVEL_TOLERANCE):
                best = i
        return best

    def require_mpp(self) -> tuple[float, float]:
        """The slide's (x, y) um/px, or a SlideError asking the caller to provide it."""
        if self.mpp is None:
            raise SlideError(
                self.path,
                "the file records no resolution (microns per pixel); pass --slide-mpp X "
                "(or mpp= to open_slide)",
            )
        return self.mpp

    def plan_read(self, size: tuple[int, int], mpp: float) -> tuple[int, tuple[int, int]]:
        """Which level to read and how many pixels there, for `size` output pixels at `mpp`.

        Returns:
            (level, (w, h) to read at that level).
        """
        if mpp <= 0:
            raise SlideError(self.path, f"target mpp must be positive, got {mpp}")
        mpp_x, mpp_y = self.require_mpp()
        level = self.best_level_for_downsample(mpp / mpp_x)
        ds = self.level_downsamples[level]
        # level-0 extent of the request, divided by the level's downsample
        w = max(1, round(size[0] * mpp / mpp_x / ds))
        h = max(1, round(size[1] * mpp / mpp_y / ds))
        return level, (w, h)

    def read_at_mpp(
        self, location: tuple[int, int], size: tuple[int, int], mpp: float
    ) -> Image.Image:
        """Read a region at a physical resolution.

        Args:
            location: top-left (x, y) in level-0 pixels.
            size: output (w, h) in pixels.
            mpp: target micrometres per output pixel.

        Returns:
            PIL RGB image of exactly `size`, from the best pyramid level, resized with Lanczos.
        """
        level, region = self.plan_read(size, mpp)
        img = self.read_region(location, level, region)
        return resize_exact(img, size)

    def thumbnail(self, max_size: int | tuple[int, int] = 1024) -> Image.Image:
        """The whole slide, fitted into `max_size` (keeping aspect), read from the best level.

        A level larger than `THUMBNAIL_CHUNK_PIXELS` is read in horizontal strips, so a slide
        without a coarse pyramid level never sits in memory whole.
        """
        mw, mh = (max_size, max_size) if isinstance(max_size, int) else max_size
        w0, h0 = self.dimensions
        scale = max(w0 / mw, h0 / mh, 1.0)
        level = self.best_level_for_downsample(scale)
        lw, lh = self.level_dimensions[level]
        out_w, out_h = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        if lw * lh <= THUMBNAIL_CHUNK_PIXELS:
            img = self.read_region((0, 0), level, (lw, lh))
            return resize_exact(img, (out_w, out_h))
        ds = self.level_downsamples[level]
        rows_per_strip = max(1, int(THUMBNAIL_CHUNK_PIXELS / lw * out_h / lh))  # output rows
        thumb = Image.new("RGB", (out_w, out_h), (255, 255, 255))
        for r0 in range(0, out_h, rows_per_strip):
            r1 = min(out_h, r0 + rows_per_strip)
            y0, y1 = round(r0 * lh / out_h), round(r1 * lh / out_h)  # level rows of this strip
            if y1 <= y0:
                continue
            strip = self.read_region((0, round(y0 * ds)), level, (lw, y1 - y0))
            thumb.paste(strip.resize((out_w, r1 - r0), _RESAMPLE), (0, r0))
        return thumb

    # ---------------------------------------------------------------- description
    def file_identity(self) -> dict[str, Any]:
        """Path, size and mtime: enough to tell whether cached outputs are stale."""
        st = os.stat(self.path)
        return {
            "path": str(self.path.resolve()),
            "size": int(st.st_size),
            "mtime_ns": int(st.st_mtime_ns),
        }

    def info(self) -> dict[str, Any]:
        """A JSON-friendly description (what `pathvlm info --json` prints)."""
        return {
            "path": str(self.path),
            "name": self.name,
            "backend": self.backend,
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": self.level_downsamples,
            "mpp": list(self.mpp) if self.mpp else None,
            "objective_power": self.objective_power,
        }


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null while libtiff (in OpenSlide or Pillow) parses a file:
    it prints its own complaints there ("TIFFFetchStripThing: IO error ..."), beside the one
    SlideError we raise. Brief (opening and decoding); other threads' stderr then is lost."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded, closed): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def resize_exact(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to exactly `size` with Lanczos (no-op when already that size)."""
    size = (int(size[0]), int(size[1]))
    return img if img.size == size else img.resize(size, _RESAMPLE)


def parse_mpp(value: Any) -> float | None:
    """A positive finite float or None (for mpp and objective power properties)."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) and out > 0 else None


def open_slide(
    path: str | Path, mpp: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Slide:
    """Open a whole-slide image (any OpenSlide format) or a plain image (PNG, JPEG, flat TIFF).

    Args:
        path: the file.
        mpp: um/px for files that do not record one; a resolution the file records wins.
        max_pixels: plain images with more pixels are refused before decoding.

    Raises:
        SlideError: missing, unreadable, truncated, unsupported or oversized file.
    """
    from pathvlm.slide.image_backend import ImageSlide, looks_like_image
    from pathvlm.slide.openslide_backend import OpenSlideSlide, detect_openslide_format

    path = Path(path)
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir():
        raise SlideError(path, "is a folder, not a slide file")
    if mpp is not None and (not math.isfinite(mpp) or mpp <= 0):
        raise SlideError(path, f"mpp must be a positive number, got {mpp}")
    fmt = detect_openslide_format(path)
    if fmt is not None:
        return OpenSlideSlide(path, fmt, mpp=mpp)
    if looks_like_image(path):
        return ImageSlide(path, mpp=mpp, max_pixels=max_pixels)
    suffix = path.suffix.lower()
    reason = "not a whole-slide image OpenSlide can read, nor a plain image (PNG, JPEG, TIFF)"
    if suffix in {
        ".svs",
        ".ndpi",
        ".mrxs",
        ".scn",
        ".bif",
        ".dcm",
        ".tif",
        ".tiff",
        ".vms",
        ".vmu",
        ".svslide",
    }:
        reason = (
            f"OpenSlide cannot read this {suffix} file (corrupt, truncated or unsupported variant)"
        )
    raise SlideError(path, reason)
