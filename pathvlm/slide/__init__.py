"""Slides in: one `Slide` interface for whole-slide and plain images, tissue detection, tiling."""

from pathvlm.slide.base import DEFAULT_MAX_PIXELS, Slide, open_slide
from pathvlm.slide.tiling import (
    TileConfig,
    TileGrid,
    draw_tiles_overlay,
    read_tile,
    save_tile_grid,
    tile_slide,
)
from pathvlm.slide.tissue import TissueConfig, TissueMask, detect_tissue

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Slide",
    "TileConfig",
    "TileGrid",
    "TissueConfig",
    "TissueMask",
    "detect_tissue",
    "draw_tiles_overlay",
    "open_slide",
    "read_tile",
    "save_tile_grid",
    "tile_slide",
]
