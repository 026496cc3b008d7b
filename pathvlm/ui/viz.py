"""Pictures for the app: thumbnail with tissue outline, heatmap overlays, full-resolution regions."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

THUMB_SIZE = 768
REGION_SIZE = 512  # level-0 pixels shown around a clicked point


def outline_tissue(thumb: Image.Image, mask: np.ndarray, colour=(0, 160, 0)) -> Image.Image:
    """The thumbnail with the border of the tissue mask (bool [h, w], any scale) drawn on it."""
    from skimage.segmentation import find_boundaries

    m = Image.fromarray(mask.astype(np.uint8) * 255).resize(thumb.size, Image.NEAREST)
    edge = find_boundaries(np.asarray(m) > 0, mode="thick")  # [H, W]
    out = np.asarray(thumb.convert("RGB")).copy()
    out[edge] = colour
    return Image.fromarray(out)


def tile_extent(coords: np.ndarray, fallback: float) -> float:
    """Level-0 side of one tile: the smallest step between tile origins (grids are regular)."""
    steps = []
    for axis in (0, 1):
        values = np.unique(coords[:, axis])
        if len(values) > 1:
            steps.append(float(np.diff(values).min()))
    return min(steps) if steps else float(fallback)


def score_grid(coords: np.ndarray, scores: np.ndarray, level0_size: tuple[int, int],
               thumb_size: tuple[int, int], extent: float) -> np.ndarray:
    """Per-tile scores painted onto a float [H, W] map at thumbnail scale (NaN = no tile)."""
    tw, th = thumb_size
    sx, sy = tw / level0_size[0], th / level0_size[1]
    grid = np.full((th, tw), np.nan, dtype=np.float32)
    for (x, y), s in zip(np.asarray(coords), np.asarray(scores, dtype=np.float32)):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, int((x + extent) * sx)), max(y0 + 1, int((y + extent) * sy))
        grid[y0:y1, x0:x1] = s
    return grid


def overlay(thumb: Image.Image, grid: np.ndarray, opacity: float, normalise: bool = True) -> Image.Image:
    """Blend a score map (NaN = transparent) over the thumbnail with a jet-like colour ramp."""
    from matplotlib import colormaps

    valid = ~np.isnan(grid)
    if not valid.any() or opacity <= 0:
        return thumb
    g = np.where(valid, grid, 0.0)
    if normalise:
        lo, hi = float(g[valid].min()), float(g[valid].max())
        g = (g - lo) / (hi - lo) if hi > lo else np.where(valid, 1.0, 0.0)
    rgb = (colormaps["jet"](np.clip(g, 0, 1))[..., :3] * 255).astype(np.float32)
    base = np.asarray(thumb.convert("RGB"), dtype=np.float32)
    alpha = (valid * float(opacity))[..., None]
    return Image.fromarray((base * (1 - alpha) + rgb * alpha).astype(np.uint8))


def region_at(slide: Any, thumb_xy: tuple[float, float], thumb_size: tuple[int, int],
              size: int = REGION_SIZE) -> tuple[Image.Image, tuple[int, int]]:
    """The level-0 region of ``size`` px centred on a click at thumbnail coordinates, and its origin."""
    w0, h0 = slide.dimensions
    cx, cy = thumb_xy[0] * w0 / thumb_size[0], thumb_xy[1] * h0 / thumb_size[1]
    sw, sh = min(size, w0), min(size, h0)
    x = int(min(max(cx - sw / 2, 0), w0 - sw))
    y = int(min(max(cy - sh / 2, 0), h0 - sh))
    return slide.read_region((x, y), 0, (sw, sh)), (x, y)


def tile_crops(slide: Any, rows: list[dict[str, Any]], extent: float, max_px: int = 160
               ) -> list[tuple[Image.Image, str]]:
    """Level-0 crops of attended tiles (rows with ``xy`` and ``weight``) for a gallery."""
    side = max(1, int(extent))
    out = []
    for r in rows:
        im = slide.read_region(tuple(r["xy"]), 0, (side, side))
        im.thumbnail((max_px, max_px))
        out.append((im, f"{r['slide']} ({r['xy'][0]}, {r['xy'][1]}) w={r['weight']:.3f}"))
    return out
