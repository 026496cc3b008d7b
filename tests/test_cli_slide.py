"""`pathvlm info` and `pathvlm tile` through the real CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pathvlm.cli import main
from pathvlm.errors import SlideError
from tests.slide_helpers import synthetic_rgb, write_pyramid_tiff


def test_info_json(wsi_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(wsi_dir / "CMU-1-Small-Region-pyramid.tiff"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dimensions"] == [2220, 2967]
    assert info["level_count"] == 4
    assert info["level_dimensions"][3] == [277, 370]
    assert info["level_downsamples"][1] == pytest.approx(2.0, rel=1e-3)
    assert info["mpp"] == pytest.approx([0.499, 0.499])
    assert info["vendor"] == "generic-tiff" and info["objective_power"] is None


def test_info_text_and_error(wsi_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(wsi_dir / "CMU-1-Small-Region.svs")]) == 0
    out = capsys.readouterr().out
    assert "aperio" in out and "20.0" in out and "[2220, 2967]" in out
    assert main(["info", str(wsi_dir / "broken.svs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: ")
        and "broken.svs: OpenSlide cannot read" in err[0]
    )


def test_tile_batch_with_failures(
    wsi_dir: Path, ihc_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blank = write_pyramid_tiff(tmp_path / "blank.tiff", synthetic_rgb(tissue=False), levels=2)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    out = tmp_path / "out"
    slides = [wsi_dir / "CMU-1-Small-Region.svs", wsi_dir / "broken.svs", blank, ihc_png, notes]
    assert main(["tile", *map(str, slides), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3
    assert "broken.svs: OpenSlide cannot read" in errors[0]
    assert "ihc.png: the file records no resolution" in errors[1] and "--slide-mpp" in errors[1]
    assert "notes.txt: not a whole-slide image" in errors[2]
    assert "Traceback" not in captured.err
    assert "tiled 2 of 5 slides, 3 failed" in captured.out
    # only the good slides have outputs, and no temporary files remain
    assert sorted(p.name for p in out.iterdir()) == [
        "CMU-1-Small-Region.h5",
        "CMU-1-Small-Region_tiles.png",
        "blank.h5",
        "blank_tiles.png",
    ]
    with h5py.File(out / "CMU-1-Small-Region.h5") as f:
        coords = f["coords"][:]
        assert coords.dtype == np.int64 and coords.ndim == 2 and coords.shape[1] == 2
        assert 40 <= len(coords) <= 70
        assert (
            (coords >= 0).all()
            and (coords[:, 0] + 224 <= 2220).all()
            and (coords[:, 1] + 224 <= 2967).all()
        )
        assert f.attrs["mpp"] == 0.5 and f.attrs["size"] == 224 and f.attrs["level"] == 0
        assert f.attrs["level_size"] == 224
        assert json.loads(f.attrs["tissue_config"])["method"] == "otsu"
    with h5py.File(out / "blank.h5") as f:
        assert f["coords"].shape == (0, 2)
    overlay = Image.open(out / "CMU-1-Small-Region_tiles.png")
    assert overlay.size == (766, 1024)  # 2220 x 2967 fitted into 1024
    arr = np.asarray(overlay.convert("RGB"))
    assert ((arr == (30, 60, 230)).all(axis=2)).sum() > 1000  # tile grid drawn
    assert ((arr == (0, 200, 0)).all(axis=2)).sum() > 500  # tissue outline drawn


def test_tile_plain_image_with_slide_mpp(
    ihc_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    rc = main(
        [
            "tile",
            str(ihc_png),
            "--out",
            str(out),
            "--slide-mpp",
            "0.5",
            "--mpp",
            "1.0",
            "--size",
            "64",
            "--min-tissue",
            "0.1",
            "--tissue",
            "thumbnail_size=256",
        ]
    )
    assert rc == 0
    with h5py.File(out / "ihc.h5") as f:
        coords = f["coords"][:]
        assert f.attrs["level_size"] == 128
        assert json.loads(f.attrs["tissue_config"])["thumbnail_size"] == 256
    # 512 px at 0.5 um/px = 4 x 4 tiles of 64 um
    assert 1 <= len(coords) <= 16 and set(np.unique(coords)) <= {0, 128, 256, 384}
    assert "ihc.png: " in capsys.readouterr().out


def test_tile_failure_leaves_no_partial_files(
    wsi_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pathvlm.slide import tiling

    def fail(*_a: object, **_k: object) -> None:
        raise SlideError("overlay", "disk full (simulated)")

    monkeypatch.setattr(tiling, "draw_tiles_overlay", fail)
    out = tmp_path / "o"
    assert main(["tile", str(wsi_dir / "CMU-1-Small-Region.svs"), "--out", str(out)]) == 2
    assert list(out.iterdir()) == []  # the h5 was complete but is not kept without its overlay
    assert "disk full (simulated)" in capsys.readouterr().err


def test_tile_bad_tissue_option(
    wsi_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "tile",
            str(wsi_dir / "CMU-1-Small-Region.svs"),
            "--out",
            str(tmp_path),
            "--tissue",
            "bogus=1",
        ]
    )
    assert rc == 2
    assert "unknown config key(s): bogus" in capsys.readouterr().err


def test_cli_process_prints_one_line(wsi_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pathvlm.cli",
            "tile",
            str(wsi_dir / "broken.svs"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.splitlines()[0]
        == f"error: {wsi_dir / 'broken.svs'}: OpenSlide cannot read this .svs "
        "file (corrupt, truncated or unsupported variant)"
    )
