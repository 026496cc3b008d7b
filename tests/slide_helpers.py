"""Synthetic pyramidal TIFFs that OpenSlide reads as generic tiled TIFF (levels = IFDs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# the tissue rectangle of `write_pyramid_tiff`, level-0 (x0, y0, x1, y1)
TISSUE_BOX = (512, 384, 1536, 1152)
SYNTH_SIZE = (2048, 1536)  # (w, h)
SYNTH_MPP = 0.5


def synthetic_rgb(tissue: bool = True, seed: int = 0) -> np.ndarray:
    """[h, w, 3] uint8: near-white glass with grey noise, plus an H&E-pink rectangle of tissue."""
    rng = np.random.default_rng(seed)
    w, h = SYNTH_SIZE
    grey = rng.integers(238, 250, size=(h, w, 1), dtype=np.uint8)
    img = np.repeat(grey, 3, axis=2)  # glass: bright and colourless
    if tissue:
        x0, y0, x1, y1 = TISSUE_BOX
        noise = rng.integers(-15, 16, size=(y1 - y0, x1 - x0, 3))
        img[y0:y1, x0:x1] = np.clip(np.array([200, 110, 175]) + noise, 0, 255).astype(np.uint8)
    return img


def write_pyramid_tiff(
    path: Path, rgb: np.ndarray, levels: int = 3, mpp: float | None = SYNTH_MPP
) -> Path:
    """Write a tiled, deflate-compressed pyramid; each level halves the previous one."""
    import tifffile

    pyramid = [rgb]
    for _ in range(levels - 1):
        prev = Image.fromarray(pyramid[-1])
        pyramid.append(
            np.asarray(prev.resize((prev.width // 2, prev.height // 2), Image.Resampling.BOX))
        )
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate(pyramid):
            res = (
                {}
                if mpp is None
                else {"resolution": (1e4 / (mpp * 2**i),) * 2, "resolutionunit": "CENTIMETER"}
            )
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if i else 0,
                **res,
            )
    return path
