"""open_slide and Slide on the real fixtures, synthetic pyramids, plain images and bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pathvlm.errors import SlideError
from pathvlm.slide import Slide, open_slide
from tests.slide_helpers import SYNTH_SIZE, synthetic_rgb, write_pyramid_tiff


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramid_tiff(tmp_path_factory.mktemp("pyr") / "synth.tiff", synthetic_rgb())


def test_svs_metadata(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs") as s:
        assert isinstance(s, Slide)
        assert s.dimensions == (2220, 2967)
        assert s.level_count == 1
        assert s.level_downsamples == [1.0]
        assert s.mpp == pytest.approx((0.499, 0.499))
        assert s.objective_power == 20.0
        assert s.vendor == "aperio"
        assert s.name == "CMU-1-Small-Region"
        # the file has label/macro/thumbnail images: none of them may leak out
        assert not hasattr(s, "associated_images")
        assert not any("associated" in k for k in s.properties)
        info = s.info()
        assert info["level_dimensions"] == [[2220, 2967]] and info["objective_power"] == 20.0


def test_pyramid_tiff_levels_and_best_level(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "CMU-1-Small-Region-pyramid.tiff") as s:
        assert s.level_count == 4
        assert s.level_dimensions[-1] == (277, 370)
        assert s.level_downsamples == pytest.approx([1, 2, 4, 8], rel=5e-3)
        assert s.mpp == pytest.approx((0.499, 0.499))
        assert s.vendor == "generic-tiff"
        assert s.best_level_for_downsample(1.99) == 0
        assert s.best_level_for_downsample(2.0) == 1  # level ds 2.0003 counts as 2
        assert s.best_level_for_downsample(7.9) == 2
        assert s.best_level_for_downsample(100) == 3
        # 2 um/px is 4.008x the slide: coarsest level not above it is level 2
        level, region = s.plan_read((224, 224), 2.0)
        assert level == 2 and region == (224, 224)
        assert s.read_at_mpp((0, 0), (224, 160), 2.0).size == (224, 160)


def test_read_at_mpp_same_pixels_from_levels(wsi_dir: Path) -> None:
    """The SVS (one level) and its pyramid copy give the same tile at 1 um/px."""
    loc = (800, 1200)
    with (
        open_slide(wsi_dir / "CMU-1-Small-Region.svs") as a,
        open_slide(wsi_dir / "CMU-1-Small-Region-pyramid.tiff") as b,
    ):
        ta = np.asarray(a.read_at_mpp(loc, (128, 128), 1.0), dtype=np.float32)
        tb = np.asarray(b.read_at_mpp(loc, (128, 128), 1.0), dtype=np.float32)
        assert b.plan_read((128, 128), 1.0)[0] == 1
    assert ta.shape == tb.shape == (128, 128, 3)
    assert ta.std() > 10  # real tissue, not blank
    assert np.abs(ta - tb).mean() < 12


def test_dicom(wsi_dir: Path) -> None:
    with open_slide(wsi_dir / "camelyon16_lymph_node.dcm") as s:
        assert s.dimensions == (1152, 700)
        assert s.vendor == "dicom"
        assert s.mpp == pytest.approx((28.969, 28.968), rel=1e-4)
        img = s.read_region((1000, 600), 0, (256, 256))  # runs past the edge
        assert img.size == (256, 256) and img.mode == "RGB"
        assert np.asarray(img)[-1, -1].tolist() == [255, 255, 255]  # outside = white


def test_a_slide_far_coarser_than_the_tiles_is_refused_by_name(wsi_dir: Path) -> None:
    from pathvlm.slide import TileConfig, tile_slide

    with open_slide(wsi_dir / "camelyon16_lymph_node.dcm") as s:  # 29 um/px: a thumbnail-level scan
        with pytest.raises(SlideError, match=r"camelyon16_lymph_node\.dcm: scanned at 29 um/px, 29x coarser "
                           r"than the 1 um/px tiles .*limit 4x"):
            tile_slide(s, TileConfig(mpp=1.0, size=112))
        assert len(tile_slide(s, TileConfig(mpp=8.0, size=112))) > 0  # 3.6x: cut (with a warning)
        assert len(tile_slide(s, TileConfig(mpp=1.0, size=112, max_upsample=0))) > 0  # no limit


def test_broken_svs(wsi_dir: Path) -> None:
    with pytest.raises(SlideError, match=r"broken\.svs: OpenSlide cannot read this \.svs file"):
        open_slide(wsi_dir / "broken.svs")


def test_synthetic_pyramid_reads_mpp(pyramid: Path) -> None:
    with open_slide(pyramid) as s:
        assert s.vendor == "generic-tiff"
        assert s.level_count == 3
        assert s.level_dimensions == [SYNTH_SIZE, (1024, 768), (512, 384)]
        assert s.mpp == pytest.approx((0.5, 0.5))
        assert s.objective_power is None
        thumb = s.thumbnail(256)
        assert thumb.size == (256, 192)
        # 1 um/px comes from level 1 without resizing
        assert s.plan_read((64, 64), 1.0) == (1, (64, 64))


def test_file_without_mpp_asks_for_it(tmp_path: Path) -> None:
    path = write_pyramid_tiff(tmp_path / "nompp.tiff", synthetic_rgb(), levels=2, mpp=None)
    with open_slide(path) as s:
        assert s.mpp is None
        with pytest.raises(SlideError, match="--slide-mpp"):
            s.read_at_mpp((0, 0), (32, 32), 0.5)
    with open_slide(path, mpp=0.25) as s:
        assert s.mpp == (0.25, 0.25)
        assert s.plan_read((32, 32), 0.5) == (1, (32, 32))


def test_plain_image(ihc_png: Path) -> None:
    with open_slide(ihc_png) as s:
        assert s.backend == "image" and s.vendor == "png"
        assert s.dimensions == (512, 512) and s.level_count == 1 and s.mpp is None
        with pytest.raises(SlideError, match=r"ihc\.png: .*--slide-mpp"):
            s.read_at_mpp((0, 0), (64, 64), 1.0)
    with open_slide(ihc_png, mpp=0.5) as s:
        tile = s.read_at_mpp((100, 50), (64, 64), 1.0)
        assert tile.size == (64, 64) and tile.mode == "RGB"
        ref = s.read_region((100, 50), 0, (128, 128)).resize((64, 64), Image.Resampling.LANCZOS)
        assert np.array_equal(np.asarray(tile), np.asarray(ref))
        assert s.thumbnail(128).size == (128, 128)


def test_pixel_budget(ihc_png: Path) -> None:
    with pytest.raises(SlideError, match="512 x 512 = 262,144 pixels, above the limit of 100,000"):
        open_slide(ihc_png, max_pixels=100_000)


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels but holds (almost) no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def test_bomb_refused_before_decoding(tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 60_000, 60_000)
    with pytest.raises(
        SlideError, match=r"bomb\.png: image has 3,600,000,000 pixels, above the limit"
    ):
        open_slide(bomb)


def test_bad_files(tmp_path: Path, ihc_png: Path) -> None:
    with pytest.raises(SlideError, match=r"missing\.svs: file not found"):
        open_slide(tmp_path / "missing.svs")
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(SlideError, match=r"notes\.txt: not a whole-slide image"):
        open_slide(text)
    truncated = tmp_path / "cut.png"
    data = ihc_png.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError, match=r"cut\.png: cannot decode image"):
        open_slide(truncated)
    with pytest.raises(SlideError, match="is a folder"):
        open_slide(tmp_path)
    with pytest.raises(SlideError, match="mpp must be a positive number"):
        open_slide(ihc_png, mpp=-1.0)


def test_truncated_tiff(tmp_path: Path, pyramid: Path) -> None:
    cut = tmp_path / "cut.tiff"
    data = pyramid.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"cut\.tiff"), open_slide(cut) as s:
        s.read_region((0, 0), 0, s.dimensions)


def test_read_region_checks(pyramid: Path) -> None:
    with open_slide(pyramid) as s:
        with pytest.raises(SlideError, match="level 5 does not exist"):
            s.read_region((0, 0), 5, (10, 10))
        with pytest.raises(SlideError, match="region size must be positive"):
            s.read_region((0, 0), 0, (0, 10))
    with pytest.raises(SlideError, match="closed"):
        s.read_region((0, 0), 0, (10, 10))


def test_budget_checked_before_decoding(tmp_path: Path) -> None:
    """Below Pillow's own limit, our budget still refuses the file without decoding it."""
    bomb = _png_header_only(tmp_path / "big.png", 12_000, 12_000)  # 144 M pixels, data missing
    with pytest.raises(SlideError, match=r"big\.png: image has 12000 x 12000 = 144,000,000 pixels"):
        open_slide(bomb, max_pixels=50_000_000)


def test_thumbnail_in_strips_matches_whole_read(
    pyramid: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathvlm.slide import base

    with open_slide(pyramid) as s:
        # from level 1 (1024 x 768) in one read, then in 8 strips
        whole = np.asarray(s.thumbnail(700), dtype=np.float32)
        monkeypatch.setattr(base, "THUMBNAIL_CHUNK_PIXELS", 100_000)
        strips = np.asarray(s.thumbnail(700), dtype=np.float32)
    assert whole.shape == strips.shape == (525, 700, 3)
    assert np.abs(whole - strips).mean() < 1.0
