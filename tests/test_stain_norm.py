"""Stain normalisation (Macenko, Reinhard/RandStainNA): the maths, failure modes, the encoder
transform and training."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_clip_mil import _clip_args

from pathvlm.cli import main
from pathvlm.data import read_pairs
from pathvlm.encoders import build_transform, create_encoder
from pathvlm.errors import ModelError
from pathvlm.stain import (
    LabReference,
    StainNormalizer,
    StainReference,
    fit_lab_reference,
    fit_reference,
    lab_statistics,
    normalize_stain,
    reference_images,
    stain_reference_from_dict,
)


def _he_like(hed: np.ndarray, amount=(1.0, 1.0), gain=(1.0, 1.0, 1.0)) -> np.ndarray:
    """[H, W, 3] uint8 H&E-like rendering of HED concentrations (DAB moved into the eosin slot).

    ``amount`` scales the H and E concentrations (staining time); ``gain`` raises each RGB
    channel's optical density by a factor, which shifts the stains' hue (another lab's dyes).
    """
    from skimage.color import hed2rgb

    conc = np.stack([hed[..., 0] * amount[0], hed[..., 2] * amount[1], np.zeros(hed.shape[:2])], -1)
    rgb = np.clip(hed2rgb(conc), 1e-3, 1.0) ** np.asarray(gain)
    return np.round(rgb * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """HED concentrations of a 224 px crop of scikit-image's bundled colon tissue."""
    from skimage import data
    from skimage.color import rgb2hed

    return rgb2hed(data.immunohistochemistry()[:224, :224])


@pytest.fixture(scope="module")
def reference(tissue) -> StainReference:
    # through the saved form, so in-memory and reloaded encoders use identical numbers
    return StainReference.from_dict(fit_reference([_he_like(tissue)]).to_dict())


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def test_two_stainings_of_one_tissue_normalise_to_nearly_the_same_colours(tissue, reference):
    dark_h = _he_like(tissue, amount=(1.4, 0.7), gain=(1.15, 1.0, 0.9))
    pink = _he_like(tissue, amount=(0.7, 1.3), gain=(0.9, 1.05, 1.15))
    before = _gap(dark_h, pink)
    after = _gap(normalize_stain(dark_h, reference), normalize_stain(pink, reference))
    assert before > 15  # the two variants really do look different
    assert after < 0.25 * before, (before, after)


def test_real_lymphoma_tile_variants_come_closer(shared_data, reference):
    from skimage.color import rgb2hed

    tiles = sorted((shared_data / "lymphoma_nia").glob("*/*.png"))
    if not tiles:
        pytest.skip(f"{shared_data / 'lymphoma_nia'} has no PNG tiles")
    hed = rgb2hed(np.asarray(Image.open(tiles[0]).convert("RGB"))[:224, :224])
    real = StainReference.from_dict(fit_reference([_he_like(hed)]).to_dict())
    a = _he_like(hed, amount=(1.3, 0.8), gain=(1.1, 1.0, 0.9))
    b = _he_like(hed, amount=(0.8, 1.3), gain=(0.9, 1.0, 1.1))
    before = _gap(a, b)
    assert _gap(normalize_stain(a, real), normalize_stain(b, real)) < 0.35 * before


def test_blank_sparse_and_single_stain_tiles_come_back_unchanged(reference):
    rng = np.random.default_rng(0)
    white = np.clip(rng.normal(245, 3, (112, 112, 3)), 0, 255).astype(np.uint8)
    sparse = white.copy()
    sparse[:10, :20] = (120, 60, 150)  # 1.6 % tissue: too little to fit two stains
    # haematoxylin alone at varying strength, all tissue: no second stain direction to find
    amount = rng.uniform(0.6, 2.0, (112, 112, 1))
    single = np.round(240 * np.exp(-amount * np.array([0.65, 0.70, 0.29]))).astype(np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning (NaN, empty slices) either
        for image in (white, sparse, single, np.zeros((112, 112, 3), np.uint8)):
            assert normalize_stain(image, reference) is image
        pil = Image.fromarray(white)
        assert normalize_stain(pil, reference) is pil
    with pytest.raises(ModelError, match="too few or hold only one stain"):
        fit_reference([white, sparse])


def test_deterministic_types_and_serialised_form(tissue, reference):
    image = _he_like(tissue, amount=(1.2, 0.9))
    out = normalize_stain(image, reference)
    assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)
    assert np.array_equal(out, normalize_stain(image.copy(), reference))
    pil_out = StainNormalizer(reference)(Image.fromarray(image))
    assert isinstance(pil_out, Image.Image) and np.array_equal(np.asarray(pil_out), out)

    images = [_he_like(tissue, amount=(a, 1.0)) for a in (0.8, 1.0, 1.2)]
    first = fit_reference(images, max_pixels=5000, seed=3).to_dict()
    assert first == fit_reference(images, max_pixels=5000, seed=3).to_dict()
    assert json.loads(json.dumps(first)) == first
    ref = StainReference.from_dict(first)
    assert ref.stain_matrix.shape == (3, 2) and ref.stain_matrix[0, 0] > ref.stain_matrix[0, 1]
    with pytest.raises(ModelError, match="3x2"):
        StainReference.from_dict({**first, "stain_matrix": [[1, 0]]})
    paths = [f"img_{i:03d}.png" for i in range(100)]
    subset = reference_images(paths[::-1] + paths, max_images=10)
    assert subset == reference_images(paths, max_images=10) and len(set(subset)) == 10


def test_encoder_transform_applies_it_and_save_load_keeps_it(tissue, reference, tmp_path):
    from pathvlm.zeroshot import ZeroShotClassifier

    encoder, plain = create_encoder("openclip:pathvlm-tiny", device="cpu")
    assert encoder.stain_norm is None
    image = Image.fromarray(_he_like(tissue, amount=(1.3, 0.8)))
    encoder.stain_norm = reference
    transform = build_transform(encoder)
    expected = plain(normalize_stain(image, reference))  # [3, 32, 32]
    assert torch.equal(transform(image), expected) and not torch.equal(plain(image), expected)
    zs = ZeroShotClassifier(encoder, classes=["tumour", "stroma"])
    assert torch.equal(zs.transform(image), expected)

    encoder.save(tmp_path / "enc")
    config = json.loads((tmp_path / "enc" / "open_clip_config.json").read_text())
    assert "stain_norm" not in config["preprocess_cfg"]
    assert config["pathvlm"]["stain_norm"] == reference.to_dict()
    loaded, loaded_transform = create_encoder(f"local-dir:{tmp_path / 'enc'}", device="cpu")
    assert loaded.stain_norm.to_dict() == reference.to_dict()
    assert torch.equal(loaded_transform(image), expected)

    # a config written before stain references existed loads exactly as before
    del config["pathvlm"]["stain_norm"]
    (tmp_path / "enc" / "open_clip_config.json").write_text(json.dumps(config))
    old, old_transform = create_encoder(f"local-dir:{tmp_path / 'enc'}", device="cpu")
    assert old.stain_norm is None and torch.equal(old_transform(image), plain(image))
    # the reference changes the features, so it changes the hash that keys cached features
    assert loaded.weights_hash != old.weights_hash
    config["pathvlm"]["stain_norm"] = {"method": "vahadane"}
    (tmp_path / "enc" / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="stain_norm"):
        create_encoder(f"local-dir:{tmp_path / 'enc'}", device="cpu")


def test_pair_dataset_normalises_before_augmenting(tissue, reference, tmp_path):
    from pathvlm.train.augment import TrainTransform
    from pathvlm.train.clip_task import PairDataset
    from pathvlm.train.config import AugmentConfig

    path = tmp_path / "tile.png"
    Image.fromarray(_he_like(tissue, amount=(1.3, 0.8))).save(path)
    augment = TrainTransform(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), AugmentConfig())
    dataset = PairDataset([{"image": str(path), "text": "x"}], augment, StainNormalizer(reference))
    expected = augment(normalize_stain(Image.open(path).convert("RGB"), reference), 5)
    assert torch.equal(dataset[(0, 5)][0], expected)


def test_train_clip_with_macenko_saves_the_reference(pairs_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_clip_args(pairs_dir, run, "train.steps=2", "train.eval_every=0",
                           "train.save_every=0", "model.stain_norm=macenko")) == 0
    config = json.loads((run / "encoder" / "open_clip_config.json").read_text())
    saved = StainReference.from_dict(config["pathvlm"]["stain_norm"])
    encoder, _ = create_encoder(f"local-dir:{run / 'encoder'}", device="cpu")
    assert encoder.stain_norm.to_dict() == saved.to_dict()
    # fitted on the train images, not a default: it is what fit_reference gives for them
    paths = reference_images([r["image"] for r in read_pairs(pairs_dir / "pairs_train.jsonl")])
    refit = fit_reference([Image.open(p).convert("RGB") for p in paths])
    assert refit.to_dict() == saved.to_dict()

    capsys.readouterr()
    assert main(_clip_args(pairs_dir, tmp_path / "bad", "model.stain_norm=vahadane")) == 2
    assert "model.stain_norm" in capsys.readouterr().err


def test_reinhard_moves_every_tile_to_the_template_and_round_trips(tissue):
    variants = [_he_like(tissue, amount=a, gain=g) for a, g in
                (((1.4, 0.7), (1.15, 1.0, 0.9)), ((0.7, 1.3), (0.9, 1.05, 1.15)), ((1.0, 1.0), (1.0, 1.0, 1.0)))]
    ref = LabReference.from_dict(fit_lab_reference(variants).to_dict())
    assert isinstance(stain_reference_from_dict(ref.to_dict()), LabReference)
    out = [ref.normalize(v) for v in variants]
    # each normalised tile has (nearly) the template's LAB statistics, whatever it started from
    for o in out:
        assert o.dtype == np.uint8 and o.shape == variants[0].shape
        assert np.abs(lab_statistics(o / 255.0) - ref.mean).max() < 1.5
    assert _gap(out[0], out[1]) < 0.5 * _gap(variants[0], variants[1])
    pil = StainNormalizer(ref)(Image.fromarray(variants[0]))
    assert isinstance(pil, Image.Image) and np.array_equal(np.asarray(pil), out[0])
    # templates for RandStainNA: around the fitted one, as wide as asked, stds kept positive
    draws = np.stack([ref.sample(np.random.default_rng(i), 2.0) for i in range(400)])
    assert np.allclose(draws.mean(0), ref.mean, atol=0.5 * ref.spread.max() + 0.2)
    assert np.allclose(draws.std(0), 2.0 * ref.spread, rtol=0.25, atol=0.05) and (draws[:, 1] > 0).all()
    blank = np.full((16, 16, 3), 240, np.uint8)  # a flat tile is shifted, never divided by zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(ref.normalize(blank)).all()
    with pytest.raises(ModelError, match="2x3"):
        LabReference.from_dict({**ref.to_dict(), "mean": [[1, 2]]})
    with pytest.raises(ModelError, match="unknown stain reference method"):
        stain_reference_from_dict({"method": "vahadane"})
    with pytest.raises(ModelError, match="at least 2 images"):
        fit_lab_reference([variants[0]])


def test_train_clip_with_reinhard_and_randstain(pairs_dir, tmp_path, capsys):
    from pathvlm.train.augment import TrainTransform
    from pathvlm.train.config import AugmentConfig

    run = tmp_path / "run"
    assert main(_clip_args(pairs_dir, run, "train.steps=2", "train.eval_every=0", "train.save_every=0",
                           "model.stain_norm=reinhard", "augment.randstain=1.0", "augment.grayscale=0.5")) == 0
    config = json.loads((run / "encoder" / "open_clip_config.json").read_text())
    saved = stain_reference_from_dict(config["pathvlm"]["stain_norm"])
    paths = reference_images([r["image"] for r in read_pairs(pairs_dir / "pairs_train.jsonl")])
    assert saved.to_dict() == fit_lab_reference([Image.open(p).convert("RGB") for p in paths]).to_dict()
    _, transform = create_encoder(f"local-dir:{run / 'encoder'}", device="cpu")
    image = Image.open(paths[0]).convert("RGB")
    plain = build_transform(create_encoder("openclip:pathvlm-tiny", device="cpu")[0])
    assert torch.equal(transform(image), plain(saved.normalize(image)))  # inference: the fitted template

    # training: with randstain 0 a crop gets exactly the template inference uses; with randstain
    # the template varies per sample; grayscale 1 gives equal channels
    none = AugmentConfig(flip=False, rot90=False, stain_jitter=0, stain_bias=0, brightness=0, scale_min=1.0)
    fixed = TrainTransform(32, (0.0,) * 3, (1.0,) * 3, none, lab=saved)
    expected = torch.from_numpy(np.asarray(saved.normalize(image.resize((32, 32), Image.BICUBIC)),
                                           np.float32) / 255).permute(2, 0, 1)
    assert (fixed(image, 0) - expected).abs().max() < 2 / 255
    rand = TrainTransform(32, (0.0,) * 3, (1.0,) * 3, AugmentConfig(**{**none.__dict__, "randstain": 1.0}), lab=saved)
    assert not torch.allclose(rand(image, 0), rand(image, 1))
    gray = TrainTransform(32, (0.0,) * 3, (1.0,) * 3, AugmentConfig(**{**none.__dict__, "grayscale": 1.0}))
    out = gray(image, 0)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])

    capsys.readouterr()
    assert main(_clip_args(pairs_dir, tmp_path / "bad", "augment.randstain=1.0")) == 2
    assert "model.stain_norm=reinhard" in capsys.readouterr().err
