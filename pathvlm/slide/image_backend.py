"""Plain-image backend (PNG, JPEG, flat TIFF, ...): one level, mpp given by the caller."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pathvlm.errors import SlideError, reason_without_path
from pathvlm.slide.base import DEFAULT_MAX_PIXELS, Slide, quiet_stderr


def looks_like_image(path: Path) -> bool:
    """True when Pillow recognises the file's header (nothing is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with quiet_stderr(), Image.open(path):
                return True
    except Image.DecompressionBombError:
        return True  # an image, just a huge one: ImageSlide refuses it with a clear message
    except (UnidentifiedImageError, OSError, ValueError):
        return False


class ImageSlide(Slide):
    """A plain image held in memory as one RGB level, refused above `max_pixels`."""

    backend = "image"

    def __init__(self, path: Path, mpp: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        try:
            with warnings.catch_warnings():
                # the pixel budget below is ours; Pillow's own global limit is not consulted first
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    w, h = img.size
                    if w * h > max_pixels:
                        raise SlideError(path, _too_big(w, h, max_pixels))
                    fmt = (img.format or "image").lower()
                    with quiet_stderr():
                        img.load()  # decode now so truncation surfaces at open time
                    rgb = _to_rgb(img)
        except Image.DecompressionBombError as exc:
            # Pillow refuses far-too-large headers itself (at 2x Image.MAX_IMAGE_PIXELS) before we see the size
            found = re.search(r"\((\d+) pixels\)", str(exc))
            count = f"{int(found.group(1)):,}" if found else "too many"
            raise SlideError(
                path,
                f"image has {count} pixels, above the limit of "
                f"{min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0)):,} (decompression-bomb guard)",
            ) from exc
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise SlideError(path, f"cannot decode image: {reason_without_path(exc, path)}") from exc
        self._image: Image.Image | None = rgb
        super().__init__(
            path,
            level_dimensions=[(w, h)],
            level_downsamples=[1.0],
            mpp=(float(mpp), float(mpp)) if mpp else None,
            objective_power=None,
            vendor=fmt,
            properties={"pathvlm.image-format": fmt},
        )

    @classmethod
    def from_image(cls, image: Image.Image, mpp: float | None = None, name: str = "image") -> ImageSlide:
        """An in-memory PIL image as a one-level slide (``name`` stands in for the file path), so
        a plain image given with its pixel size is read at a target scale like any slide."""
        if mpp is not None and not mpp > 0:
            raise SlideError(name, f"mpp must be a positive number, got {mpp}")
        self = cls.__new__(cls)
        self._image = _to_rgb(image)
        Slide.__init__(self, name, level_dimensions=[image.size], level_downsamples=[1.0],
                       mpp=(float(mpp), float(mpp)) if mpp else None, objective_power=None,
                       vendor="image", properties={"pathvlm.image-format": "in-memory"})
        return self

    def _read_level_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        if self._image is None:
            raise SlideError(self.path, "slide is closed")
        x, y = location
        w, h = size
        if x >= 0 and y >= 0 and x + w <= self.dimensions[0] and y + h <= self.dimensions[1]:
            return self._image.crop((x, y, x + w, y + h))
        # partly outside: white, like the OpenSlide backend shows glass outside the scan
        out = Image.new("RGB", (w, h), (255, 255, 255))
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.dimensions[0], x + w), min(self.dimensions[1], y + h)
        if x1 > x0 and y1 > y0:
            out.paste(self._image.crop((x0, y0, x1, y1)), (x0 - x, y0 - y))
        return out

    def close(self) -> None:
        self._image = None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grey: scale to 8 bit rather than clipping
        return img.point(lambda v: v / 256).convert("L").convert("RGB")
    return img.convert("RGB")


def _too_big(w: int, h: int, max_pixels: int) -> str:
    return (
        f"image has {w} x {h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
        "(decompression-bomb guard; raise max_pixels / --max-pixels if the file is trusted)"
    )
