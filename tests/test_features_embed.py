"""Feature files, slide-list handling, and the embed pipeline on the real fixtures."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pathvlm.embed import (
    EmbedConfig,
    collect_slides,
    embed_image,
    embed_slides,
    parse_shard,
    select_shard,
)
from pathvlm.errors import ConfigError
from pathvlm.features import FeatureFileError, is_complete, load_features, write_features

TINY = "openclip:pathvlm-tiny"
# coarse tiles keep the real-slide runs to a few dozen tiles
FAST = {
    "encoder": TINY,
    "mpp": 2.0,
    "size": 64,
    "batch_size": 16,
    "num_workers": 0,
    "device": "cpu",
    "progress": False,
}


# ---------------------------------------------------------------- feature files


def test_write_load_round_trip(tmp_path):
    feats = torch.randn(5, 8)
    coords = torch.arange(10).reshape(5, 2) * 100
    path = write_features(
        tmp_path / "s.h5", feats, coords, {"encoder": "e", "mpp": 0.5, "tissue_config": {"a": 1}}
    )
    bag = load_features(path)
    assert bag.features.dtype == torch.float32 and torch.equal(bag.features, feats)
    assert bag.coords.dtype == torch.int64 and torch.equal(bag.coords, coords)
    assert bag.attrs["encoder"] == "e" and bag.attrs["mpp"] == 0.5
    assert bag.attrs["tissue_config"] == '{"a": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # no temporary left behind


def test_empty_bag_round_trip(tmp_path):
    write_features(tmp_path / "e.h5", np.zeros((0, 16), np.float32), np.zeros((0, 2), np.int64), {})
    bag = load_features(tmp_path / "e.h5")
    assert bag.features.shape == (0, 16) and bag.coords.shape == (0, 2)


def test_bad_feature_files(tmp_path):
    with pytest.raises(FeatureFileError, match="not found"):
        load_features(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(FeatureFileError, match="junk.h5: not a readable HDF5"):
        load_features(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(FeatureFileError, match="not a pathvlm feature file"):
        load_features(other)


def test_is_complete_compares_resume_keys(tmp_path):
    key = {
        "encoder": "e",
        "encoder_weights_hash": "abc",
        "mpp": 0.5,
        "patch_size": 224,
        "tissue_config": '{"t": 1}',
        "slide_size": 10,
        "slide_mtime_ns": 123,
    }
    path = write_features(tmp_path / "s.h5", torch.zeros(1, 2), torch.zeros(1, 2), key)
    assert is_complete(path, key)
    assert not is_complete(path, {**key, "encoder_weights_hash": "abd"})
    assert not is_complete(path, {**key, "slide_mtime_ns": 124})
    assert not is_complete(path, {**key, "mpp": 1.0})
    assert not is_complete(tmp_path / "none.h5", key)


# ---------------------------------------------------------------- inputs and shards


def test_collect_slides_folders_lists_globs(tmp_path):
    for name in ("b.svs", "a.tiff", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text("# slides\nb.svs\n\nmissing.svs\n")
    got = collect_slides([tmp_path, listing, str(tmp_path / "*.svs")])
    assert [p.name for p in got] == ["a.tiff", "b.svs", "missing.svs"]
    with pytest.raises(ConfigError, match="glob matched no files"):
        collect_slides([str(tmp_path / "*.ndpi")])


def test_shards_and_ranks_are_disjoint_and_complete(monkeypatch):
    slides = [Path(f"/s/{i:02d}.svs") for i in range(23)]
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    parts = [select_shard(slides, f"{i}/3", rank=(r, 2)) for i in range(3) for r in range(2)]
    flat = [p for part in parts for p in part]
    assert sorted(flat) == slides and len(flat) == len(set(flat))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert select_shard(slides, None) == slides[1::4]
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


# ---------------------------------------------------------------- embedding real slides


@pytest.fixture(scope="module")
def tiny():
    from pathvlm.encoders import create_encoder

    return create_encoder(TINY, device="cpu")


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "CMU-1-Small-Region-pyramid.tiff"])
def test_embed_real_slide_matches_tile_grid(wsi_dir, tmp_path, tiny, name):
    from pathvlm.slide import TileConfig, TissueConfig, open_slide, tile_slide

    result = embed_slides(
        [wsi_dir / name], tmp_path, EmbedConfig(**FAST), encoder_and_transform=tiny
    )
    assert result.ok and len(result.written) == 1
    bag = load_features(tmp_path / f"{Path(name).stem}.h5")
    with open_slide(wsi_dir / name) as slide:
        grid = tile_slide(slide, TileConfig(mpp=2.0, size=64), TissueConfig())
    assert 10 < len(bag) == len(grid.coords)
    assert bag.features.shape == (len(bag), tiny[0].embed_dim)
    assert torch.equal(bag.coords, torch.as_tensor(np.asarray(grid.coords), dtype=torch.int64))
    assert torch.isfinite(bag.features).all()
    attrs = bag.attrs
    assert attrs["encoder"] == TINY and attrs["encoder_weights_hash"] == tiny[0].weights_hash
    assert attrs["patch_size"] == 64 and attrs["mpp"] == 2.0
    assert attrs["slide_size"] == (wsi_dir / name).stat().st_size


def test_workers_give_the_same_features(wsi_dir, tmp_path, tiny):
    svs = wsi_dir / "CMU-1-Small-Region.svs"
    embed_slides([svs], tmp_path / "w0", EmbedConfig(**FAST), encoder_and_transform=tiny)
    embed_slides(
        [svs],
        tmp_path / "w2",
        EmbedConfig(**{**FAST, "num_workers": 2}),
        encoder_and_transform=tiny,
    )
    a, b = (
        load_features(tmp_path / "w0" / "CMU-1-Small-Region.h5"),
        load_features(tmp_path / "w2" / "CMU-1-Small-Region.h5"),
    )
    assert torch.equal(a.coords, b.coords) and torch.allclose(a.features, b.features, atol=1e-5)


def test_resume_skips_complete_and_redoes_other_weights(wsi_dir, tmp_path, tiny):
    svs = wsi_dir / "CMU-1-Small-Region.svs"
    first = embed_slides([svs], tmp_path, EmbedConfig(**FAST), encoder_and_transform=tiny)
    out = first.written[0]
    mtime = out.stat().st_mtime_ns
    again = embed_slides([svs], tmp_path, EmbedConfig(**FAST), encoder_and_transform=tiny)
    assert again.skipped == [out] and not again.written and out.stat().st_mtime_ns == mtime
    from pathvlm.encoders import create_encoder

    other = create_encoder(TINY, device="cpu")  # same seeded init: change a weight -> new hash
    with torch.no_grad():
        next(other[0].parameters()).add_(1.0)
    other[0].refresh_hash()
    assert other[0].weights_hash != tiny[0].weights_hash
    redo = embed_slides([svs], tmp_path, EmbedConfig(**FAST), encoder_and_transform=other)
    assert (
        redo.written == [out]
        and load_features(out).attrs["encoder_weights_hash"] == other[0].weights_hash
    )


class _Crash(RuntimeError):
    pass


def test_crash_mid_slide_leaves_no_feature_file(wsi_dir, tmp_path, tiny):
    encoder, transform = tiny
    calls = {"n": 0}
    original = encoder.encode_image

    def failing(x, normalize=False):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Crash("simulated kill")
        return original(x, normalize)

    encoder.encode_image = failing
    try:
        with pytest.raises(_Crash):
            embed_slides(
                [wsi_dir / "CMU-1-Small-Region.svs"],
                tmp_path,
                EmbedConfig(**FAST),
                encoder_and_transform=(encoder, transform),
            )
    finally:
        del encoder.encode_image
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []


def test_broken_slide_fails_alone(wsi_dir, tmp_path, tiny, capsys):
    from pathvlm.cli import main

    result = embed_slides(
        [wsi_dir / "broken.svs", wsi_dir / "CMU-1-Small-Region.svs"],
        tmp_path,
        EmbedConfig(**FAST),
        encoder_and_transform=tiny,
    )
    assert [Path(p).name for p, _ in result.failed] == ["broken.svs"]
    assert "broken.svs" in result.failed[0][1]
    assert [p.name for p in result.written] == ["CMU-1-Small-Region.h5"]
    assert not (tmp_path / "broken.h5").exists()
    code = main(
        [
            "-q",
            "embed",
            str(wsi_dir / "broken.svs"),
            str(wsi_dir / "CMU-1-Small-Region.svs"),
            "--out",
            str(tmp_path),
            "--encoder",
            TINY,
            "--mpp",
            "2",
            "--size",
            "64",
            "--num-workers",
            "0",
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    failure_lines = [ln for ln in captured.err.splitlines() if ln.startswith("failed:")]
    assert len(failure_lines) == 1 and "broken.svs" in failure_lines[0]
    assert "Traceback" not in captured.err


def test_blank_slide_gives_empty_bag(tmp_path, tiny, caplog):
    import tifffile

    blank = tmp_path / "blank.tiff"
    page = np.full((1024, 1024, 3), 245, np.uint8)
    with tifffile.TiffWriter(blank) as tif:
        tif.write(page, tile=(256, 256), photometric="rgb", compression="zlib")
    result = embed_slides(
        [blank],
        tmp_path / "out",
        EmbedConfig(**{**FAST, "slide_mpp": 0.5}),
        encoder_and_transform=tiny,
    )
    assert result.ok, result.failed
    bag = load_features(tmp_path / "out" / "blank.h5")
    assert bag.features.shape == (0, tiny[0].embed_dim) and bag.coords.shape == (0, 2)
    assert "no tissue" in caplog.text


def test_embed_image_tiles_cover_the_image(ihc_png, tiny):
    from PIL import Image

    encoder, transform = tiny
    image = Image.open(ihc_png)
    bag = embed_image(image, encoder, transform, size=224)
    w, h = image.size
    xs, ys = sorted({int(x) for x in bag.coords[:, 0]}), sorted({int(y) for y in bag.coords[:, 1]})
    assert xs[0] == 0 and xs[-1] == w - 224 and ys[0] == 0 and ys[-1] == h - 224
    assert bag.features.shape == (len(xs) * len(ys), encoder.embed_dim)
    small = embed_image(image.resize((100, 80)), encoder, transform, size=224)
    assert small.features.shape == (1, encoder.embed_dim)


def test_thin_image_is_not_padded(tiny):
    from PIL import Image

    encoder, transform = tiny
    bag = embed_image(Image.new("RGB", (500, 100), (180, 90, 160)), encoder, transform, size=224)
    assert bag.coords[:, 1].tolist() == [0, 0, 0] and bag.coords[:, 0].tolist() == [0, 224, 276]
    # each tile is the 224 x 100 strip itself, not a 224 x 224 crop padded with black
    strip = transform(Image.new("RGB", (224, 100), (180, 90, 160)))[None]
    with torch.inference_mode():
        expected = encoder.encode_image(strip)[0]
    assert torch.allclose(bag.features[0], expected, atol=1e-5)


def test_unknown_tissue_setting_is_a_config_error(tmp_path, tiny):
    with pytest.raises(ConfigError, match="tissue.nope"):
        embed_slides(
            [tmp_path],
            tmp_path,
            EmbedConfig(**{**FAST, "tissue": {"nope": 1}}),
            encoder_and_transform=tiny,
        )


def test_pooled_image_embeddings_average_the_native_tiles(ihc_png, tiny):
    from PIL import Image

    from pathvlm.embed import pooled_image_embeddings

    encoder, transform = tiny
    big = Image.open(ihc_png).convert("RGB").crop((0, 0, 300, 200))
    small = big.resize((50, 40))
    emb = pooled_image_embeddings([big, small, big], encoder, transform, size=128, batch_size=3)
    assert emb.shape == (3, encoder.embed_dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    # the big image is the normalised mean of its unit tile embeddings, as embed_image cuts them
    tiles = torch.nn.functional.normalize(embed_image(big, encoder, transform, size=128).features, dim=-1)
    assert tiles.shape[0] == 6  # 3 x 2 tiles of 128 px at native scale
    expected = torch.nn.functional.normalize(tiles.mean(0), dim=-1)
    assert torch.allclose(emb[0], expected, atol=1e-5) and torch.allclose(emb[2], expected, atol=1e-5)
    # an image no larger than a tile is embedded whole; size=None embeds every image whole
    with torch.inference_mode():
        whole = torch.nn.functional.normalize(encoder.encode_image(transform(small)[None]), dim=-1)[0]
        whole_big = torch.nn.functional.normalize(encoder.encode_image(transform(big)[None]), dim=-1)[0]
    assert torch.allclose(emb[1], whole, atol=1e-5)
    untiled = pooled_image_embeddings([big], encoder, transform, size=None)
    assert torch.allclose(untiled[0], whole_big, atol=1e-5)
