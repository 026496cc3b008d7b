"""Tissue detection and tiling at physical resolution on synthetic pyramids and the real SVS."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pathvlm.errors import SlideError
from pathvlm.slide import TileConfig, TissueConfig, detect_tissue, open_slide, read_tile, tile_slide
from pathvlm.slide.tissue import otsu_threshold, tissue_from_rgb
from tests.slide_helpers import SYNTH_SIZE, TISSUE_BOX, synthetic_rgb, write_pyramid_tiff


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid_tiff(tmp_path_factory.mktemp("tis") / "synth.tiff", synthetic_rgb())


@pytest.fixture(scope="module")
def blank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid_tiff(
        tmp_path_factory.mktemp("tis") / "blank.tiff", synthetic_rgb(tissue=False)
    )


def test_mask_matches_tissue_box(synth: Path) -> None:
    with open_slide(synth) as s:
        tm = detect_tissue(s, TissueConfig(thumbnail_size=512))
    assert tm.mask.shape == (384, 512) and tm.mask.dtype == bool
    assert tm.downsample == pytest.approx((4.0, 4.0))
    x0, y0, x1, y1 = (v // 4 for v in TISSUE_BOX)
    truth = np.zeros_like(tm.mask)
    truth[y0:y1, x0:x1] = True
    assert (tm.mask != truth).mean() < 0.005  # at most a rim of pixels differs
    assert tm.fraction == pytest.approx(0.25, abs=0.01)
    assert 0.07 <= tm.threshold < 0.5


def test_blank_slide_gives_empty_mask_and_no_tiles(
    blank: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with open_slide(blank) as s:
        tm = detect_tissue(s, TissueConfig(thumbnail_size=512))
        assert not tm.mask.any()
        with caplog.at_level(logging.WARNING, logger="pathvlm.slide.tiling"):
            grid = tile_slide(s, TileConfig(mpp=0.5, size=128), TissueConfig(thumbnail_size=512))
    assert len(grid) == 0 and grid.coords.shape == (0, 2) and grid.coords.dtype == np.int64
    assert "no tissue tiles" in caplog.text


def test_otsu_floor_guards_flat_and_noisy_glass() -> None:
    rng = np.random.default_rng(1)
    flat = np.full((64, 64, 3), 250, np.uint8)
    assert otsu_threshold(np.zeros(100)) == 1.0
    mask, thr = tissue_from_rgb(flat, TissueConfig())
    assert not mask.any()
    # faintly tinted glass: Otsu alone would split it in two; the floor keeps it empty
    tint = np.clip(flat.astype(int) + rng.integers(-6, 1, size=(64, 64, 3)), 0, 255).astype(
        np.uint8
    )
    mask, thr = tissue_from_rgb(tint, TissueConfig(min_area=1))
    assert thr >= 0.07 and not mask.any()
    mask, _ = tissue_from_rgb(tint, TissueConfig(min_saturation=0.0, min_area=1, opening_radius=0))
    assert mask.any()  # without the floor the noise becomes "tissue": the guard is what helps


def test_morphology_and_min_area() -> None:
    img = np.full((100, 100, 3), 245, np.uint8)
    img[20:60, 20:60] = (190, 100, 170)  # tissue square
    img[35:45, 35:45] = 245  # a hole in it
    img[80:83, 80:83] = (190, 100, 170)  # a 9-px speck
    mask, _ = tissue_from_rgb(img, TissueConfig(opening_radius=0, closing_radius=0, min_area=20))
    assert mask[40, 40]  # hole filled
    assert not mask[81, 81]  # speck removed by min_area
    mask, _ = tissue_from_rgb(
        img, TissueConfig(opening_radius=0, closing_radius=0, min_area=1, fill_holes=False)
    )
    assert not mask[40, 40] and mask[81, 81]
    assert mask.sum() == 1600 - 100 + 9


@pytest.mark.parametrize(
    ("mpp", "size", "level", "level_size"), [(0.5, 128, 0, 128), (1.0, 64, 1, 64), (2.0, 32, 2, 32)]
)
def test_tiles_at_physical_resolution(
    synth: Path, mpp: float, size: int, level: int, level_size: int
) -> None:
    """128 level-0 px per tile at every resolution: the 1024 x 768 tissue box holds 8 x 6 tiles."""
    with open_slide(synth) as s:
        grid = tile_slide(
            s, TileConfig(mpp=mpp, size=size, min_tissue=0.25), TissueConfig(thumbnail_size=512)
        )
        assert (grid.level, grid.level_size, grid.size, grid.mpp) == (level, level_size, size, mpp)
        assert len(grid) == 48
        x0, y0, x1, y1 = TISSUE_BOX
        assert grid.coords.dtype == np.int64
        assert (grid.coords[:, 0] >= x0).all() and (grid.coords[:, 0] + 128 <= x1).all()
        assert (grid.coords[:, 1] >= y0).all() and (grid.coords[:, 1] + 128 <= y1).all()
        assert (grid.tissue_fraction > 0.95).all()
        tile = np.asarray(read_tile(s, grid, 0))
    assert tile.shape == (size, size, 3)
    assert (
        abs(tile[..., 0].mean() - 200) < 8 and abs(tile[..., 1].mean() - 110) < 8
    )  # pink, not glass


def test_threshold_stride_and_bounds(synth: Path) -> None:
    with open_slide(synth) as s:
        tc = TissueConfig(thumbnail_size=512)
        every = tile_slide(s, TileConfig(mpp=0.5, size=128, min_tissue=0.0), tc)
        # min_tissue 0 still needs some tissue; the box plus its partial neighbours never exceeds the grid
        assert 48 <= len(every) <= 16 * 12
        half = tile_slide(s, TileConfig(mpp=0.5, size=128, stride=64, min_tissue=0.6), tc)
        # stride 64: boxes wholly inside start at 512, 576, ... 1408 -> 15 x 11; half-in ones (0.5) fail 0.6
        assert len(half) == 15 * 11
        big = tile_slide(s, TileConfig(mpp=0.5, size=300, min_tissue=0.0), tc)
        w, h = SYNTH_SIZE
        assert (big.coords[:, 0] + 300 <= w).all() and (big.coords[:, 1] + 300 <= h).all()
        with pytest.raises(SlideError, match="min_tissue"):
            tile_slide(s, TileConfig(min_tissue=1.5), tc)


def test_svs_tiles_at_half_micron(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:
        grid = tile_slide(s, TileConfig(mpp=0.5, size=224), TissueConfig())
        assert grid.level == 0 and grid.level_size == 224  # 224 * 0.5 / 0.499 = 224.4
        # 9 x 13 possible tiles on 2220 x 2967 px; the skin section covers a bit over a third
        assert 40 <= len(grid) <= 70
        assert (grid.coords[:, 0] + 224 <= 2220).all() and (grid.coords[:, 1] + 224 <= 2967).all()
        tm = grid.tissue
        assert tm is not None
        for x, y in grid.coords:  # every kept tile's centre lies on (or next to) detected tissue
            cx, cy = int((x + 112) / tm.downsample[0]), int((y + 112) / tm.downsample[1])
            assert tm.mask[max(0, cy - 40) : cy + 40, max(0, cx - 40) : cx + 40].any()
        tiles = [np.asarray(read_tile(s, grid, i)) for i in range(0, len(grid), 10)]
    assert all(t.shape == (224, 224, 3) for t in tiles)
    assert np.mean([t.mean() for t in tiles]) < 225  # stained tissue, not glass


def test_small_slide_mask_is_no_finer_than_2_um_and_keeps_the_same_tiles(wsi_dir: Path) -> None:
    """A 2048 px thumbnail of a 1.1 x 1.5 mm crop is 1.4 um/px (0.6 s of tissue detection, more
    than the tiles' reading); the default caps it at 2 um/px with the same tiles kept."""
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:
        fine = tile_slide(s, TileConfig(mpp=0.5, size=224), TissueConfig(thumbnail_mpp=None))
        capped = tile_slide(s, TileConfig(mpp=0.5, size=224), TissueConfig())
    assert fine.tissue.mask.shape == (2048, 1532)
    assert capped.tissue.mask.shape == (740, 554)  # 2967 px * 0.499 um/px / 2 um/px
    assert np.array_equal(fine.coords, capped.coords)


def test_pyramid_tiff_tiles_from_coarser_level(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region-pyramid.tiff") as s:
        grid = tile_slide(s, TileConfig(mpp=2.0, size=112), TissueConfig(thumbnail_size=1024))
        assert grid.level == 2 and grid.level_size == 112
        assert 5 <= len(grid) <= 20
        assert read_tile(s, grid, 0).size == (112, 112)
