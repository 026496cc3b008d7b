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
        plain = pooled_image_embeddings(turned, encoder, transform, size=40)
        encoder.test_views = 8
        viewed = pooled_image_embeddings(turned, encoder, transform, size=40)
        # slide tiles (size=None, already cut) are embedded as they are: one view, as embed_slide does
        as_slide_tiles = pooled_image_embeddings(turned, encoder, transform, size=None)
    finally:
        encoder.test_views = 1
    assert torch.allclose(as_slide_tiles, plain, atol=1e-6)
    # one view: the random encoder sees a turned tile differently; eight: the same mean
    assert float((plain[0] - plain[1]).abs().max()) > 1e-3
    assert torch.allclose(viewed[0], viewed[1], atol=1e-5) and torch.allclose(viewed[0], viewed[2], atol=1e-5)
    # and the mean is the mean of the eight single views, re-normalised
    encoder.test_views = 1
    singles = pooled_image_embeddings(tile_views(tile, 8), encoder, transform, size=40)
    expect = torch.nn.functional.normalize(singles.sum(0), dim=-1)
    assert torch.allclose(viewed[0], expect, atol=1e-5)


def test_the_first_two_and_four_views_are_closed_under_composition():
    tile = _tile(3)
    for n in (2, 4):
        views = {np.asarray(v).tobytes() for v in tile_views(tile, n)}
        for v in tile_views(tile, n):  # every view of a view is again one of the n
            assert {np.asarray(w).tobytes() for w in tile_views(v, n)} == views


def test_a_plain_images_feature_bag_holds_each_tiles_mean_over_its_views(tiny):
    encoder, transform = tiny
    image = _tile(2, size=100)  # four 50 px tiles; a batch of 8 holds two tiles' four views
    try:
        encoder.test_views = 4
        bag = embed_image(image, encoder, transform, size=50, batch_size=8)
    finally:
        encoder.test_views = 1
    assert bag.features.shape[0] == 4 and bag.attrs["test_views"] == 4
    for feat, (x, y) in zip(bag.features, bag.coords.tolist()):
        tile = image.crop((x, y, x + 50, y + 50))
        with torch.inference_mode():
            expect = encoder.encode_image(torch.stack([transform(v) for v in tile_views(tile, 4)])).float().mean(0)
        assert torch.allclose(feat, expect, atol=1e-5)


def test_a_calibration_fitted_with_other_views_is_not_applied(tiny):
    from pathvlm.calibration import Calibration
    from pathvlm.model import ModelConfig, build_model
    from pathvlm.scoring import Scorer

    tiny_llm = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "tie_word_embeddings": True}
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="openclip:pathvlm-tiny", n_tokens=4, hidden_dim=32, llm_config=tiny_llm,
                                    max_case_tokens=8, tile_mpp=4.0, tile_size=64))
    cal = Calibration({}, 0.6, 0.9, model.encoder.weights_hash, {"encoder_test_views": 1})
    assert Scorer(model, calibration=cal).problem is None
    model.encoder.test_views = 8
    problem = Scorer(model, calibration=cal).problem
    assert "fitted with 1 test view(s) of each tile, this encoder uses 8: ignored" in problem
    # a file from before views were recorded was fitted with one
    assert Scorer(model, calibration=Calibration({}, 0.6, 0.9, model.encoder.weights_hash)).problem


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


def test_assembling_a_model_with_a_bad_view_count_removes_nothing(tiny, tmp_path):
    from pathvlm.model.demo import assemble_demo

    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("a model folder")
    with pytest.raises(ConfigError, match="test_views must be one of 1, 2, 4, 8, got 3"):
        assemble_demo(tmp_path / "no-encoder-needed", out, test_views=3)
    assert (out / "keep.txt").read_text() == "a model folder"


def test_clip_cv_names_an_unknown_evaluation_or_fold_before_training(tmp_path, capsys):
    from conftest import load_script

    clip_cv = load_script("clip_cv")
    assert clip_cv._kinds("pcam") == ["zeroshot", "linear_probe", "zeroshot_stain0.05", "zeroshot_views2",
                                      "zeroshot_views4", "zeroshot_views8"]
    (tmp_path / "lymphoma_nia").mkdir()
    (tmp_path / "lymphoma_nia" / "index.csv").write_text("path,label,split\n")
    base = ["-c", "clip_demo", "--out", str(tmp_path / "cv"), "--data", str(tmp_path), "--folds", "2"]
    assert clip_cv.main([*base, "--kinds", "zeroshot,zeroshot_view8"]) == 2
    assert "unknown ['zeroshot_view8']" in capsys.readouterr().err
    assert clip_cv.main([*base, "--only-folds", "2"]) == 2
    assert "--only-folds '2' not folds of 0..1" in capsys.readouterr().err
    assert not (tmp_path / "cv").exists()
