"""Zero-shot classifier: prompt ensembling, probabilities, top-k slide pooling, error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathvlm.errors import ConfigError, ModelError
from pathvlm.zeroshot import (
    DEFAULT_LOGIT_SCALE,
    ZeroShotClassifier,
    load_prompts,
    make_prompt_set,
    topk_pool,
    zero_shot,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    from pathvlm.encoders import create_encoder

    torch.manual_seed(0)
    encoder, transform = create_encoder("openclip:pathvlm-tiny", device="cpu")
    return encoder, transform


class FakeEncoder(torch.nn.Module):
    """Text prompts map to fixed 2-D vectors; images to their mean (R, B) colour."""

    name = "fake"
    weights_hash = "fakehash"
    has_text = True
    embed_dim = 2

    def __init__(self, table: dict[str, list[float]]):
        super().__init__()
        self.preprocess_cfg = {"size": 8}
        self.table = table
        self.text_calls = 0
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, texts):
        self.text_calls += 1
        return torch.tensor([self.table[t] for t in texts], dtype=torch.float32)

    def encode_image(self, x):
        return x.mean(dim=(2, 3))[:, [0, 2]]  # [B, 2]: red, blue


def _solid(rgb, size=16):
    return Image.new("RGB", (size, size), rgb)


def test_prompt_ensembling_is_mean_of_normalised_embeddings_fake():
    enc = FakeEncoder({"red thing": [3.0, 0.0], "crimson": [0.0, 0.5], "blue thing": [0.0, 1.0]})
    clf = ZeroShotClassifier(
        enc, {"red": ["red thing", "crimson"], "blue": ["blue thing"]}, templates=["{}"]
    )
    # hand: normalise [3,0]->[1,0] and [0,.5]->[0,1], mean [.5,.5], renormalise [.7071,.7071]
    expect = torch.tensor([[2**-0.5, 2**-0.5], [0.0, 1.0]])
    assert torch.allclose(clf.class_embeddings, expect, atol=1e-6)
    assert clf.logit_scale == DEFAULT_LOGIT_SCALE  # no logit_scale on the fake -> 100


def test_prompt_ensembling_matches_hand_computation_tiny(tiny):
    encoder, _ = tiny
    classes = {"tumour": ["tumour", "carcinoma"], "fat": ["adipose tissue"]}
    templates = ["an H&E image of {}.", "{}, H&E."]
    clf = ZeroShotClassifier(encoder, classes, templates=templates)
    for row, (cls, syns) in zip(clf.class_embeddings, classes.items()):
        prompts = [t.format(s) for s in syns for t in templates]
        with torch.no_grad():
            emb = encoder.encode_text(prompts)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        assert torch.allclose(row, mean / mean.norm(), atol=1e-5), cls
    assert clf.logit_scale == pytest.approx(
        float(encoder.model.logit_scale.detach().exp()), rel=1e-5
    )


def test_text_embeddings_cached_per_prompt_set():
    enc = FakeEncoder({"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0]})
    ZeroShotClassifier(enc, ["a", "b"], templates=["{}"])
    calls = enc.text_calls
    ZeroShotClassifier(enc, ["a", "b"], templates=["{}"])
    assert enc.text_calls == calls
    ZeroShotClassifier(enc, ["a", "c"], templates=["{}"])
    assert enc.text_calls == calls + 2  # one encode_text call per class
    with torch.no_grad():  # an optimiser step changes the weights but not the load-time hash
        enc.w.add_(1.0)
    ZeroShotClassifier(enc, ["a", "b"], templates=["{}"])
    assert enc.text_calls == calls + 4


def test_predict_probs_sum_to_one_and_labels(tiny, tmp_path):
    encoder, transform = tiny
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, rgb in enumerate([(200, 30, 40), (30, 40, 200), (240, 240, 240)]):
        _solid(rgb, 40).save(folder / f"im{i}.png")
    clf = ZeroShotClassifier(encoder, "tumour,stroma,fat", transform=transform)
    result = clf.predict([_solid((10, 200, 10), 40), folder / "im0.png", folder])
    assert result.probs.shape == (5, 3)
    assert np.allclose(result.probs.sum(axis=1), 1.0)
    assert result.labels == [clf.classes[i] for i in result.probs.argmax(1)]
    assert [p for _, p in result.top] == pytest.approx(result.probs.max(axis=1).tolist())
    df = result.to_dataframe()
    assert list(df.columns) == ["input", "label", "tumour", "stroma", "fat"] and len(df) == 5
    assert zero_shot(encoder, folder, ["tumour", "fat"], transform=transform).probs.shape == (3, 2)


def test_fake_encoder_classifies_by_colour():
    enc = FakeEncoder({"red": [1.0, 0.0], "blue": [0.0, 1.0]})
    clf = ZeroShotClassifier(enc, ["red", "blue"], templates=["{}"], transform=_to_tensor)
    result = clf.predict([_solid((250, 0, 0)), _solid((0, 0, 250)), _solid((200, 0, 90))])
    assert result.labels == ["red", "blue", "red"]


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_topk_pool_hand_case():
    logits = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 5.0], [0.0, 1.0]])
    assert topk_pool(logits, 2) == pytest.approx([2.5, 3.0])
    assert topk_pool(logits, 1) == pytest.approx([3.0, 5.0])
    assert topk_pool(logits, 99) == pytest.approx(logits.mean(axis=0))


def test_feature_file_slide_prediction_and_class_map(tmp_path):
    from pathvlm.features import write_features

    enc = FakeEncoder({"red": [1.0, 0.0], "blue": [0.0, 1.0]})
    clf = ZeroShotClassifier(enc, ["red", "blue"], templates=["{}"], top_k=2)
    # 4 weakly red tiles, 2 strongly blue ones: mean pooling says red, top-2 pooling says blue
    feats = np.array([[1, 0.8]] * 4 + [[0, 1]] * 2, dtype=np.float32)
    coords = np.arange(12).reshape(6, 2) * 224
    path = write_features(
        tmp_path / "slide1.h5",
        feats,
        coords,
        {"encoder": "fake", "encoder_weights_hash": "fakehash", "mpp": 0.5},
    )
    result = clf.predict(path)
    assert result.names == [str(path)] and result.labels == ["blue"]
    slide = result.slides[str(path)]
    cmap = slide.class_map()
    assert cmap["coords"].shape == (6, 2) and cmap["probs"].shape == (6, 2)
    assert cmap["label"].tolist() == [0, 0, 0, 0, 1, 1]
    assert np.allclose(slide.tile_probs.sum(1), 1)
    other = write_features(
        tmp_path / "slide2.h5",
        feats,
        coords,
        {"encoder": "other", "encoder_weights_hash": "otherhash"},
    )
    with pytest.raises(ModelError, match="re-embed"):
        clf.predict(other)


def test_vision_only_encoder_is_a_clear_error():
    from pathvlm.encoders import create_encoder

    encoder, _ = create_encoder("openclip:pathvlm-tiny", device="cpu", vision_only=True)
    with pytest.raises(ModelError, match="no text tower"):
        ZeroShotClassifier(encoder, ["a", "b"])


def test_model_with_encoder_attribute_is_accepted():
    enc = FakeEncoder({"red": [1.0, 0.0], "blue": [0.0, 1.0]})

    class Model:
        encoder = enc
        transform = staticmethod(_to_tensor)

    assert ZeroShotClassifier(Model(), ["red", "blue"], templates=["{}"]).predict(
        _solid((255, 0, 0))
    ).labels == ["red"]


@pytest.mark.parametrize(
    "name,codes",
    [
        ("crc_tissue", ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]),
        ("lymphoma", ["CLL", "FL", "MCL", "DLBCL", "CHL", "reactive"]),
    ],
)
def test_shipped_prompt_files(name, codes):
    ps = load_prompts(REPO / "configs" / "prompts" / f"{name}.json")
    assert ps.names == codes
    for code in codes:
        assert code in ps.classes[code]
    assert all(t.count("{}") == 1 for t in ps.templates)


def test_prompt_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.json: no such file, and not a packaged prompt set"):
        load_prompts(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classes": {"a": ["x"], "b": ["y"]}, "templates": ["no slot"]}))
    with pytest.raises(ConfigError, match="exactly one"):
        load_prompts(bad)
    with pytest.raises(ConfigError, match="at least two"):
        make_prompt_set(["only"])


def test_slide_tiles_pooled_with_class_map(tiny, wsi_dir):
    from pathvlm.slide import TileConfig, open_slide

    encoder, transform = tiny
    path = wsi_dir / "CMU-1-Small-Region.svs"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    clf = ZeroShotClassifier(encoder, ["tumour", "stroma", "fat"], transform=transform, top_k=3)
    with open_slide(path) as slide:
        res = clf.predict_slide(slide, tile_config=TileConfig(mpp=4.0, size=128))
    n = len(res.coords)
    assert n > 0 and res.tile_logits.shape == (n, 3)
    assert res.logits == pytest.approx(topk_pool(res.tile_logits, 3))
    assert res.probs.sum() == pytest.approx(1.0) and res.label in clf.classes
    cmap = res.class_map()
    assert cmap["label"].shape == (n,) and (cmap["label"] == res.tile_probs.argmax(1)).all()
