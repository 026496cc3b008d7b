"""Test-time views: a plain image's tiles embedded in their turns and mirror images, averaged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pathvlm.embed import embed_image, encoder_views, pooled_image_embeddings, tile_views
from pathvlm.encoders import create_encoder
from pathvlm.errors import ConfigError, ModelError


@pytest.fixture(scope="module")
def tiny():
    encoder, transform = create_encoder("openclip:pathvlm-tiny", device="cpu")
    return encoder, transform


def _tile(seed: int = 0, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_views_are_the_turns_and_mirror_images_of_the_square():
    tile = _tile()
    a = np.asarray(tile)
    for n in (1, 2, 4, 8):
        views = [np.asarray(v) for v in tile_views(tile, n)]
        assert len(views) == n and np.array_equal(views[0], a)
        assert len({v.tobytes() for v in views}) == n  # no view twice
    eight = {np.asarray(v).tobytes() for v in tile_views(tile, 8)}
    dihedral = {np.rot90(f, k).tobytes() for f in (a, a[:, ::-1]) for k in range(4)}
    assert eight == dihedral
    with pytest.raises(ConfigError, match="test_views must be one of 1, 2, 4, 8, got 3"):
        tile_views(tile, 3)


def test_eight_views_make_an_embedding_that_does_not_depend_on_orientation(tiny):
    encoder, transform = tiny
    tile = _tile(1)
    turned = [tile, tile.transpose(Image.Transpose.ROTATE_90), tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    try:
        encoder.test_views = 1
        plain = pooled_image_embeddings(turned, encoder, transform, size=None)
        encoder.test_views = 8
        viewed = pooled_image_embeddings(turned, encoder, transform, size=None)
    finally:
        encoder.test_views = 1
    # one view: the random encoder sees a turned tile differently; eight: the same mean
    assert float((plain[0] - plain[1]).abs().max()) > 1e-3
    assert torch.allclose(viewed[0], viewed[1], atol=1e-5) and torch.allclose(viewed[0], viewed[2], atol=1e-5)
    # and the mean is the mean of the eight single views, re-normalised
    encoder.test_views = 1
    singles = pooled_image_embeddings(tile_views(tile, 8), encoder, transform, size=None)
    expect = torch.nn.functional.normalize(singles.sum(0), dim=-1)
    assert torch.allclose(viewed[0], expect, atol=1e-5)


def test_a_plain_images_feature_bag_holds_each_tiles_mean_over_its_views(tiny):
    encoder, transform = tiny
    image = _tile(2, size=50)
    try:
        encoder.test_views = 4
        bag = embed_image(image, encoder, transform, size=50)
    finally:
        encoder.test_views = 1
    with torch.inference_mode():
        x = torch.stack([transform(v) for v in tile_views(image, 4)])
        expect = encoder.encode_image(x).float().mean(0)
    assert bag.features.shape[0] == 1 and bag.attrs["test_views"] == 4
    assert torch.allclose(bag.features[0], expect, atol=1e-5)


def test_an_encoders_views_are_saved_with_it_and_checked_on_load(tiny, tmp_path):
    encoder, _ = tiny
    try:
        encoder.test_views = 8
        out = encoder.save(tmp_path / "enc")
    finally:
        encoder.test_views = 1
    loaded, _ = create_encoder(f"local-dir:{out}", device="cpu")
    assert encoder_views(loaded) == 8 and loaded.weights_hash == encoder.weights_hash
    config = json.loads((out / "open_clip_config.json").read_text())
    config["pathvlm"]["test_views"] = 3
    (out / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"open_clip_config.json: pathvlm.test_views must be one of 1, 2, 4, 8, got 3"):
        create_encoder(f"local-dir:{out}", device="cpu")
    # one view is the default and is not written
    plain = encoder.save(tmp_path / "plain")
    assert "test_views" not in json.loads((plain / "open_clip_config.json").read_text())["pathvlm"]


def test_eval_zeroshot_takes_test_views_and_reports_them(tmp_path, capsys):
    from pathvlm.cli import main

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for cls, base in (("TUM", (150, 40, 120)), ("ADI", (240, 230, 235))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = np.clip(np.array(base) + rng.normal(0, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    probs = {}
    for views in ("1", "8"):
        out = tmp_path / f"zs{views}.json"
        assert main(["-q", "eval", "zeroshot", "--data", str(root), "--prompts", "crc_tissue", "--n-boot", "0",
                     "--model", "encoder:openclip:pathvlm-tiny", "--json", str(out), "--test-views", views]) == 0
        res = json.loads(out.read_text())
        assert res["test_views"] == int(views)
        probs[views] = (tmp_path / f"zs{views}_predictions.csv").read_text()
    assert probs["1"] != probs["8"]  # the views change the scores of a random encoder
    with pytest.raises(SystemExit):
        main(["eval", "zeroshot", "--data", str(root), "--test-views", "3"])
    assert "invalid choice: 3" in capsys.readouterr().err
