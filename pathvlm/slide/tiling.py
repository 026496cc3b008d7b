"""Tiling at a physical resolution: a regular grid of level-0 coordinates kept by tissue fraction."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pathvlm.errors import SlideError
from pathvlm.slide.base import Slide, resize_exact
from pathvlm.slide.tissue import TissueConfig, TissueMask, detect_tissue

log = logging.getLogger(__name__)

MAX_UPSAMPLE = 4.0  # a scan at 4 um/px shows a 7 um nucleus as ~2 px: the coarsest worth reading at 1 um/px


@dataclass
class TileConfig:
    """Which tiles to cut.

    Attributes:
        mpp: target micrometres per output pixel (0.5 is "20x").
        size: output tile side in pixels.
        min_tissue: keep tiles whose tissue fraction (from the mask) is at least this, in [0, 1].
        stride: step between tiles in output pixels; None = `size` (no overlap).
        max_upsample: refuse a slide scanned this many times coarser than `mpp` (its tiles would
            be blown up from a few pixels: the detail an encoder reads is not in the scan);
            0 = no limit. Between 1.1x and the limit the tiles are cut with a warning.
    """

    mpp: float = 0.5
    size: int = 224
    min_tissue: float = 0.25
    stride: int | None = None
    max_upsample: float = MAX_UPSAMPLE


def upsample_refusal(source_mpp: float, mpp: float, limit: float = MAX_UPSAMPLE) -> str | None:
    """Why pixels at ``source_mpp`` um/px cannot be cut at ``mpp`` um/px (None: they can): the
    scan is more than ``limit`` times coarser (0 = no limit)."""
    factor = source_mpp / mpp
    if not limit or factor <= limit:
        return None
    return (f"scanned at {source_mpp:.3g} um/px, {factor:.0f}x coarser than the {mpp:g} um/px tiles the "
            f"encoder reads (limit {limit:g}x): too coarse to show cells; give a scan at "
            f"{mpp * limit:g} um/px or finer")


@dataclass
class TileGrid:
    """The kept tiles of one slide.

    Attributes:
        coords: int64 [N, 2] level-0 (x, y) of each tile's top-left corner.
        size: output tile side in pixels.
        mpp: output um/px.
        level: pyramid level the tiles are read from.
        level_size: tile side in pixels read at `level` (then resized to `size`).
        tissue_fraction: float32 [N], tissue fraction of each tile.
        extent: tile side in level-0 pixels (x, y).
        stride: step between tiles in output pixels.
        tissue: the mask the tiles were selected with.
    """

    coords: np.ndarray
    size: int
    mpp: float
    level: int
    level_size: int
    tissue_fraction: np.ndarray
    extent: tuple[float, float] = (0.0, 0.0)
    stride: int = 0
    tissue: TissueMask | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def _overlap_weights(starts: np.ndarray, extent: float, scale: float, n_px: int) -> np.ndarray:
    """[len(starts), n_px]: how much of each mask pixel lies inside each interval, in mask px."""
    a = starts[:, None] / scale  # interval bounds in mask pixels
    b = (starts[:, None] + extent) / scale
    px = np.arange(n_px, dtype=np.float64)[None, :]
    return np.clip(np.minimum(b, px + 1) - np.maximum(a, px), 0.0, None)


def tissue_fractions(
    mask: TissueMask, xs: np.ndarray, ys: np.ndarray, extent: tuple[float, float]
) -> np.ndarray:
    """Exact area-weighted tissue fraction of every grid box, float [len(ys), len(xs)]."""
    m = mask.mask.astype(np.float64)  # [h, w]
    wx = _overlap_weights(
        xs.astype(np.float64), extent[0], mask.downsample[0], m.shape[1]
    )  # [nx, w]
    wy = _overlap_weights(
        ys.astype(np.float64), extent[1], mask.downsample[1], m.shape[0]
    )  # [ny, h]
    covered = wy @ (m @ wx.T)  # [ny, nx]
    area = wy.sum(axis=1)[:, None] * wx.sum(axis=1)[None, :]
    return np.where(area > 0, covered / np.maximum(area, 1e-12), 0.0)


def tile_slide(
    slide: Slide,
    cfg: TileConfig | None = None,
    tissue_cfg: TissueConfig | None = None,
    tissue: TissueMask | None = None,
) -> TileGrid:
    """Cut `slide` into tiles of `cfg.size` px at `cfg.mpp` and keep those on tissue.

    Args:
        slide: an open Slide with a known mpp.
        cfg: tile size, resolution, tissue threshold, stride.
        tissue_cfg: how to detect tissue (ignored when `tissue` is given).
        tissue: a precomputed mask.

    Returns:
        TileGrid; no tile extends past the slide. A slide without tissue gives zero tiles and a
        logged warning.
    """
    cfg = cfg or TileConfig()
    if cfg.size <= 0:
        raise SlideError(slide.path, f"tile size must be positive, got {cfg.size}")
    if not 0.0 <= cfg.min_tissue <= 1.0:
        raise SlideError(slide.path, f"min_tissue must be in [0, 1], got {cfg.min_tissue}")
    stride = cfg.stride or cfg.size
    mpp_x, mpp_y = slide.require_mpp()
    refusal = upsample_refusal(min(mpp_x, mpp_y), cfg.mpp, cfg.max_upsample)
    if refusal:
        raise SlideError(slide.path, refusal)
    if cfg.mpp < 0.9 * min(mpp_x, mpp_y):
        log.warning(
            "%s: tiles at %.3g um/px are upsampled from a slide scanned at %.3g um/px",
            slide.path,
            cfg.mpp,
            min(mpp_x, mpp_y),
        )
    level, (level_size, _) = slide.plan_read((cfg.size, cfg.size), cfg.mpp)
    extent = (cfg.size * cfg.mpp / mpp_x, cfg.size * cfg.mpp / mpp_y)  # level-0 px
    step = (stride * cfg.mpp / mpp_x, stride * cfg.mpp / mpp_y)
    w0, h0 = slide.dimensions
    nx = int(np.floor((w0 - extent[0]) / step[0] + 1e-9)) + 1 if w0 >= extent[0] else 0
    ny = int(np.floor((h0 - extent[1]) / step[1] + 1e-9)) + 1 if h0 >= extent[1] else 0
    if tissue is None:
        tissue = detect_tissue(slide, tissue_cfg)
    xs = np.round(np.arange(nx) * step[0]).astype(np.int64)
    ys = np.round(np.arange(ny) * step[1]).astype(np.int64)
    if nx and ny:
        frac = tissue_fractions(tissue, xs, ys, extent)  # [ny, nx]
        iy, ix = np.nonzero(frac >= max(cfg.min_tissue, 1e-9))  # row-major: top to bottom
        coords = np.stack([xs[ix], ys[iy]], axis=1).astype(np.int64)
        fractions = frac[iy, ix].astype(np.float32)
    else:
        coords = np.zeros((0, 2), dtype=np.int64)
        fractions = np.zeros((0,), dtype=np.float32)
    if len(coords) == 0:
        log.warning(
            "%s: no tissue tiles (tissue covers %.1f%% of the slide, %d x %d grid at %.3g um/px)",
            slide.path,
            100 * tissue.fraction,
            nx,
            ny,
            cfg.mpp,
        )
    return TileGrid(
        coords=coords,
        size=cfg.size,
        mpp=float(cfg.mpp),
        level=level,
        level_size=int(level_size),
        tissue_fraction=fractions,
        extent=extent,
        stride=stride,
        tissue=tissue,
    )


def read_tile(slide: Slide, grid: TileGrid, i: int) -> Image.Image:
    """Tile `i` of `grid` as a PIL RGB image of exactly `grid.size` x `grid.size`."""
    x, y = (int(v) for v in grid.coords[i])
    img = slide.read_region((x, y), grid.level, (grid.level_size, grid.level_size))
    return resize_exact(img, (grid.size, grid.size))


def draw_tiles_overlay(slide: Slide, grid: TileGrid, max_size: int = 1024) -> Image.Image:
    """A thumbnail with the tissue outline (green) and the kept tiles (blue) drawn on it."""
    thumb = slide.thumbnail(max_size).convert("RGB")
    w0, h0 = slide.dimensions
    sx, sy = thumb.width / w0, thumb.height / h0
    if grid.tissue is not None and grid.tissue.mask.any():
        mask = Image.fromarray(grid.tissue.mask.astype(np.uint8) * 255).resize(
            thumb.size, Image.Resampling.NEAREST
        )
        m = np.asarray(mask) > 0
        edge = m & ~_erode(m)
        arr = np.asarray(thumb).copy()
        arr[edge] = (0, 200, 0)
        thumb = Image.fromarray(arr)
    draw = ImageDraw.Draw(thumb)
    for x, y in grid.coords:
        draw.rectangle(
            [x * sx, y * sy, (x + grid.extent[0]) * sx - 1, (y + grid.extent[1]) * sy - 1],
            outline=(30, 60, 230),
        )
    return thumb


def _erode(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1, mode="edge")
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def save_tile_grid(
    grid: TileGrid,
    slide: Slide,
    out_dir: str | Path,
    tissue_cfg: TissueConfig | None = None,
    overlay_size: int = 1024,
) -> tuple[Path, Path]:
    """Write `<out>/<stem>.h5` (dataset `coords` + attributes) and `<out>/<stem>_tiles.png`.

    Both are written under temporary names and renamed only when both are complete, so a failure
    leaves neither.
    """
    import h5py

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    h5_path = out_dir / f"{slide.name}.h5"
    png_path = out_dir / f"{slide.name}_tiles.png"
    tmp_h5 = out_dir / f".{slide.name}.h5.tmp{os.getpid()}"
    tmp_png = out_dir / f".{slide.name}_tiles.png.tmp{os.getpid()}"
    try:
        with h5py.File(tmp_h5, "w") as f:
            f.create_dataset("coords", data=np.asarray(grid.coords, dtype=np.int64).reshape(-1, 2))
            f.create_dataset(
                "tissue_fraction", data=np.asarray(grid.tissue_fraction, dtype=np.float32)
            )
            f.attrs["mpp"] = float(grid.mpp)
            f.attrs["patch_size"] = int(grid.size)
            f.attrs["size"] = int(grid.size)
            f.attrs["level"] = int(grid.level)
            f.attrs["level_size"] = int(grid.level_size)
            f.attrs["stride"] = int(grid.stride)
            tc = tissue_cfg or TissueConfig()
            f.attrs["tissue_config"] = json.dumps(
                dataclasses.asdict(tc), sort_keys=True, default=str
            )
            f.attrs["slide_path"] = str(slide.path)
            f.attrs["slide_dimensions"] = np.asarray(slide.dimensions, dtype=np.int64)
            f.attrs["slide_mpp"] = np.asarray(slide.require_mpp(), dtype=np.float64)
        draw_tiles_overlay(slide, grid, overlay_size).save(tmp_png, format="PNG")
        os.replace(tmp_h5, h5_path)
        os.replace(tmp_png, png_path)
    finally:
        for tmp in (tmp_h5, tmp_png):
            tmp.unlink(missing_ok=True)
    return h5_path, png_path
