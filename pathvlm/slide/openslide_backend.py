"""OpenSlide backend: SVS, NDPI, MRXS, SCN, BIF, DICOM WSI, generic tiled TIFF and the rest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from pathvlm.errors import DependencyError, SlideError
from pathvlm.slide.base import Slide, parse_mpp, quiet_stderr

log = logging.getLogger(__name__)

# properties that describe associated images (label, macro: patient identifiers) are dropped
_HIDDEN_PREFIXES = ("openslide.associated.",)

# A TIFF's tables are checked before OpenSlide reads pixels: libtiff/glib abort the whole process
# when a corrupt header makes them allocate a tile of terabytes, and a header that claims far more
# pixels than exist turns a thumbnail into hours of reading nothing.
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MAX_TILE_PIXELS = 4096 * 4096
MAX_LEVEL_PIXELS = 10**11  # ~316k x 316k px; the largest scans are ~2e10
_MAX_PAGES = 64


def _openslide() -> Any:
    try:
        import openslide
    except ImportError as exc:  # openslide-bin missing or the shared library cannot load
        raise DependencyError(
            f"OpenSlide is not available ({exc}); install it with: pip install openslide-python openslide-bin"
        ) from exc
    return openslide


def detect_openslide_format(path: Path) -> str | None:
    """OpenSlide's vendor name for `path`, or None when OpenSlide does not recognise it."""
    openslide = _openslide()
    try:
        with quiet_stderr():
            return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide. Associated images are never touched."""

    backend = "openslide"

    def __init__(self, path: Path, vendor: str, mpp: float | None = None):
        check_tiff_tables(path)
        openslide = _openslide()
        self._openslide_error = openslide.OpenSlideError
        try:
            with quiet_stderr():
                self._osr = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(path, f"OpenSlide cannot open this {vendor} file: {exc}") from exc
        props = {
            k: v for k, v in self._osr.properties.items() if not k.startswith(_HIDDEN_PREFIXES)
        }
        file_mpp = _file_mpp(props)
        if file_mpp is not None and mpp is not None and abs(file_mpp[0] - mpp) > 1e-3 * mpp:
            log.warning(
                "%s: file records %.4f um/px; ignoring the given %.4f", path, file_mpp[0], mpp
            )
        super().__init__(
            path,
            level_dimensions=list(self._osr.level_dimensions),
            level_downsamples=list(self._osr.level_downsamples),
            mpp=file_mpp or ((float(mpp), float(mpp)) if mpp else None),
            objective_power=parse_mpp(props.get("openslide.objective-power")),
            vendor=props.get("openslide.vendor", vendor),
            properties=props,
        )

    def _read_level_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        if self._osr is None:
            raise SlideError(self.path, "slide is closed")
        try:
            rgba = self._osr.read_region(location, level, size)
        except self._openslide_error as exc:
            raise SlideError(
                self.path, f"cannot read region {location} level {level}: {exc}"
            ) from exc
        # OpenSlide marks pixels outside the scanned area transparent: show them as white glass
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        return rgb

    def close(self) -> None:
        if getattr(self, "_osr", None) is not None:
            self._osr.close()
            self._osr = None


def check_tiff_tables(path: Path) -> None:
    """Refuse a TIFF-based slide whose tables cannot describe real pixels: tiles or strips larger
    than any scanner writes, a level claiming more than ``MAX_LEVEL_PIXELS``, fewer tiles than
    its size needs, or data past the end of the file. Other formats pass unchecked."""
    import struct

    import tifffile

    with open(path, "rb") as f:
        if f.read(4) not in _TIFF_MAGIC:
            return
    size = path.stat().st_size
    quiet = logging.getLogger("tifffile")  # it logs each bad tag; the one SlideError says it all
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(path) as tif:
            for i, page in enumerate(tif.pages):
                if i >= _MAX_PAGES:
                    break
                _check_page(path, i, page, size)
    except (tifffile.TiffFileError, ValueError, TypeError, KeyError, IndexError, OverflowError,
            struct.error, OSError, MemoryError) as exc:
        raise SlideError(path, f"corrupt TIFF structure ({str(exc)[:200]})") from None
    finally:
        quiet.setLevel(level)


def _check_page(path: Path, i: int, page: Any, file_size: int) -> None:
    w, h = int(page.imagewidth), int(page.imagelength)
    if w <= 0 or h <= 0 or w * h > MAX_LEVEL_PIXELS:
        raise SlideError(path, f"TIFF page {i} claims {w} x {h} px (corrupt header?)")
    offsets, counts = page.dataoffsets, page.databytecounts
    if page.is_tiled:  # OpenSlide reads tiled pages; stripped ones (flat images) go to Pillow
        tw, th = int(page.tilewidth), int(page.tilelength)
        if tw <= 0 or th <= 0 or tw * th > MAX_TILE_PIXELS:
            raise SlideError(path, f"TIFF page {i} has tiles of {tw} x {th} px (corrupt header?)")
        needed = -(-w // tw) * -(-h // th)
    else:
        needed = -(-h // max(1, min(int(page.rowsperstrip or h), h)))
    if len(offsets) < needed:
        raise SlideError(path, f"TIFF page {i} lists {len(offsets)} tiles or strips; {w} x {h} px need "
                               f"{needed} (corrupt header?)")
    end = max((int(o) + int(c) for o, c in zip(offsets, counts) if c), default=0)
    if end > file_size:
        raise SlideError(path, f"TIFF page {i} has pixel data past the end of the file "
                               f"(byte {end:,} of {file_size:,}: truncated or corrupt)")


def _file_mpp(props: dict[str, str]) -> tuple[float, float] | None:
    x = parse_mpp(props.get("openslide.mpp-x"))
    y = parse_mpp(props.get("openslide.mpp-y"))
    if x is None and y is None:
        return None
    return (x or y, y or x)  # type: ignore[return-value]
