"""OpenSlide backend: SVS, NDPI, MRXS, SCN, BIF, DICOM WSI, generic tiled TIFF and the rest."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from pathvlm.errors import DependencyError, SlideError
from pathvlm.slide.base import Slide, parse_mpp

log = logging.getLogger(__name__)

# properties that describe associated images (label, macro: patient identifiers) are dropped
_HIDDEN_PREFIXES = ("openslide.associated.",)


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
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide. Associated images are never touched."""

    backend = "openslide"

    def __init__(self, path: Path, vendor: str, mpp: float | None = None):
        openslide = _openslide()
        self._openslide_error = openslide.OpenSlideError
        try:
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


def _file_mpp(props: dict[str, str]) -> tuple[float, float] | None:
    x = parse_mpp(props.get("openslide.mpp-x"))
    y = parse_mpp(props.get("openslide.mpp-y"))
    if x is None and y is None:
        return None
    return (x or y, y or x)  # type: ignore[return-value]
