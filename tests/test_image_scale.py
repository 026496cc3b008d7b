"""Plain images at their own scale: a pixel size resamples them to the encoder's tile scale."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pathvlm.cli import main
from pathvlm.embed import image_tiles, pooled_image_embeddings
from pathvlm.encoders import create_encoder
from pathvlm.errors import ConfigError, ModelError
from pathvlm.slide.base import resize_exact

DEMO = "pathvlm-demo"  # the default model's encoder (tile_mpp recorded with it)
TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- the one tiling function


def test_image_tiles_resample_through_the_slide_reader():
    image = _noise(448, 230)
    tiles, coords = image_tiles(image, 112, mpp=0.5, target_mpp=1.0)
    # 224 image px per 112 px tile; the last row shifted inward to cover every pixel
    assert coords == [(0, 0), (224, 0), (0, 6), (224, 6)]
    assert all(t.size == (112, 112) for t in tiles)
    expected = resize_exact(image.crop((224, 6, 448, 230)), (112, 112))
    assert np.array_equal(np.asarray(tiles[3]), np.asarray(expected))
    # a coarser image is enlarged to the tile scale: 56 px of a 2 um/px image per tile
    up, up_coords = image_tiles(_noise(112, 56), 112, mpp=2.0, target_mpp=1.0)
    assert up_coords == [(0, 0), (56, 0)] and all(t.size == (112, 112) for t in up)


def test_image_tiles_clip_a_small_image_at_the_target_scale():
    tiles, coords = image_tiles(_noise(150, 90), 112, mpp=0.5, target_mpp=1.0)
    assert coords == [(0, 0)] and tiles[0].size == (75, 45)  # no padding, same scale


def test_image_tiles_without_a_pixel_size_keep_native_pixels():
    image = _noise(300, 120)
    for mpp, target in ((None, 1.0), (0.5, None), (1.0, 1.0)):
        tiles, coords = image_tiles(image, 112, mpp=mpp, target_mpp=target)
        assert coords == [(0, 0), (112, 0), (188, 0), (0, 8), (112, 8), (188, 8)]
        assert np.array_equal(np.asarray(tiles[0]), np.asarray(image.crop((0, 0, 112, 112))))


def test_a_pixel_size_without_a_target_scale_is_an_error():
    encoder, transform = create_encoder("openclip:pathvlm-tiny", device="cpu")
    assert encoder.tile_mpp is None
    with pytest.raises(ConfigError, match="records no tile scale"):
        pooled_image_embeddings([_noise(64, 64)], encoder, transform, 32, mpp=0.5)


# ---------------------------------------------------------------- chat, reports, cases (tiny model)


@pytest.fixture(scope="module")
def tiny_model():
    from pathvlm.model import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(encoder="openclip:pathvlm-tiny", n_tokens=4, hidden_dim=32, llm_config=TINY_LLM,
                      max_case_tokens=8, tile_mpp=2.0, tile_size=32)
    return build_model(cfg)


def test_ask_takes_the_image_pixel_size_and_says_when_it_assumed_one(tiny_model, tmp_path):
    from pathvlm.model.inputs import resolve_inputs
    from pathvlm.slide import TileConfig

    image = _noise(128, 64)
    tiny_model.ask(image, "What tissue is this?", max_new_tokens=2)
    assert len(tiny_model.last_notes) == 1 and "assumed 2 um/px" in tiny_model.last_notes[0]
    tiny_model.ask(image, "What tissue is this?", mpp=0.5, max_new_tokens=2)
    assert tiny_model.last_notes == []
    # 0.5 um/px -> 2 um/px: 128 px of image per 32 px tile, so one tile instead of eight
    tile = TileConfig(mpp=2.0, size=32)
    bag = resolve_inputs(image, tiny_model.encoder, tiny_model.transform, tile, mpp=0.5)[0].bag
    native = resolve_inputs(image, tiny_model.encoder, tiny_model.transform, tile)[0].bag
    assert len(bag) == 1 and len(native) == 8
    assert bag.attrs["image_mpp"] == 0.5 and not bag.attrs["mpp_assumed"]
    assert native.attrs["mpp_assumed"] and native.attrs["image_mpp"] == 2.0
    with pytest.raises(ModelError, match="positive"):
        tiny_model.ask(image, "?", mpp=-1.0)


def test_case_entry_mpp_wins_and_report_flags_an_assumed_scale(tiny_model, tmp_path):
    from pathvlm.case import CaseError, load_case
    from pathvlm.model.inputs import resolve_inputs
    from pathvlm.slide import TileConfig

    _noise(128, 64).save(tmp_path / "a.png")
    _noise(128, 64, seed=1).save(tmp_path / "b.png")
    (tmp_path / "case.yaml").write_text(
        "id: c1\nslides:\n  - {path: a.png, stain: H&E, mpp: 0.5}\n  - {path: b.png, stain: H&E}\n")
    case = load_case(tmp_path / "case.yaml")
    assert case.slides[0].summary()["mpp"] == 0.5 and case.slides[1].mpp is None
    tile = TileConfig(mpp=2.0, size=32)
    a, b = resolve_inputs(case, tiny_model.encoder, tiny_model.transform, tile, mpp=1.0)
    assert a.bag.attrs["image_mpp"] == 0.5 and b.bag.attrs["image_mpp"] == 1.0  # entry, then call
    report = tiny_model.draft_report(str(tmp_path / "case.yaml"), "colorectal_biopsy")
    notes = [f for f in report.flags if "pixel size unknown" in f]
    assert len(notes) == 1 and "b" in notes[0] and "a.png" not in notes[0]
    assert tiny_model.last_notes == notes
    given = tiny_model.draft_report(str(tmp_path / "a.png"), "colorectal_biopsy", mpp=0.5)
    assert not [f for f in given.flags if "pixel size unknown" in f]
    (tmp_path / "bad.yaml").write_text("id: c2\nslides:\n  - {path: a.png, mpp: -2}\n")
    with pytest.raises(CaseError, match=r"slides\[0\]\.mpp"):
        load_case(tmp_path / "bad.yaml")


def test_a_case_goes_on_without_a_slide_too_coarse_to_tile_and_says_so(tiny_model, tmp_path):
    from pathvlm.errors import SlideError
    from pathvlm.model.inputs import resolve_inputs, scale_notes
    from pathvlm.slide import TileConfig

    _noise(128, 64).save(tmp_path / "a.png")
    _noise(64, 64, seed=1).save(tmp_path / "coarse.png")
    (tmp_path / "case.yaml").write_text("id: c3\nslides:\n  - {path: a.png, stain: H&E, mpp: 0.5}\n"
                                        "  - {path: coarse.png, stain: H&E, mpp: 20}\n")
    tile = TileConfig(mpp=2.0, size=32)  # 20 um/px is 10x coarser than the tiles: above the 4x limit
    slides = resolve_inputs(str(tmp_path / "case.yaml"), tiny_model.encoder, tiny_model.transform, tile)
    assert [s.name for s in slides] == ["a"]
    assert len(slides.left_out) == 1
    assert "slide coarse left out of case c3" in slides.left_out[0] and "10x coarser" in slides.left_out[0]
    assert scale_notes(slides) == slides.left_out
    report = tiny_model.draft_report(str(tmp_path / "case.yaml"), "colorectal_biopsy")
    assert [f for f in report.flags if "left out" in f] == slides.left_out
    assert [s["name"] for s in report.to_json_dict()["slides"]] == ["a", "coarse"]  # the case lists it
    # alone, the same image is an error naming it; a case with no readable slide cannot be answered
    with pytest.raises(SlideError, match=r"coarse\.png: scanned at 20 um/px, 10x coarser .*\(limit 4x\)"):
        tiny_model.ask(str(tmp_path / "coarse.png"), "What tissue is this?", mpp=20, max_new_tokens=2)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")  # a corrupt image is left out the same way
    (tmp_path / "with_broken.yaml").write_text("id: c7\nslides:\n  - {path: a.png, mpp: 0.5}\n"
                                               "  - {path: broken.png}\n")
    kept = resolve_inputs(str(tmp_path / "with_broken.yaml"), tiny_model.encoder, tiny_model.transform, tile)
    assert [s.name for s in kept] == ["a"] and "slide broken left out of case c7: cannot read image" in kept.left_out[0]
    assert str(tmp_path) not in kept.left_out[0]  # the reason carries no server path
    (tmp_path / "bad.yaml").write_text("id: c4\nslides:\n  - {path: coarse.png, mpp: 20}\n")
    with pytest.raises(ModelError, match="case c4: no slide could be read"):
        resolve_inputs(str(tmp_path / "bad.yaml"), tiny_model.encoder, tiny_model.transform, tile)
    loose = TileConfig(mpp=2.0, size=32, max_upsample=0)  # no limit: cut, upsampled
    assert len(resolve_inputs(str(tmp_path / "bad.yaml"), tiny_model.encoder, tiny_model.transform, loose)) == 1


def test_resampled_copies_are_written_once_at_the_stated_scale(tmp_path):
    import os

    from pathvlm.eval.common import write_resampled_copies
    from pathvlm.eval.datasets import load_csv

    for i, label in enumerate(("TUM", "STR")):
        _noise(108, 108, seed=i).save(tmp_path / f"t{i}.png")
    rows = [(str(tmp_path / "t0.png"), "TUM", "val"), (str(tmp_path / "t1.png"), "STR", "train")]
    index = write_resampled_copies(rows, tmp_path / "copies")
    copy = tmp_path / "copies" / "TUM" / "t0.png"
    with Image.open(copy) as im:
        assert im.size == (224, 224)
    data = load_csv(index, split="val")
    assert data.labels == ["TUM"] and data.image_mpps() == [0.5]
    stamp = os.stat(copy).st_mtime_ns
    write_resampled_copies(rows, tmp_path / "copies")  # a second fold reuses the copies
    assert os.stat(copy).st_mtime_ns == stamp


# ---------------------------------------------------------------- real CRC tiles, demo encoder


@pytest.fixture(scope="module")
def crc_pairs(shared_data, tmp_path_factory):
    """The 224 px 0.5 um/px NCT-CRC-HE-100K reference tiles, and each resized by hand to 1 um/px."""
    ref = shared_data / "crc_tiles" / "nct100k_reference"
    big = sorted(ref.glob("*/*.tif"))
    if not big:
        pytest.skip(f"{ref} holds no reference tiles")
    root = tmp_path_factory.mktemp("crc_1um")
    small = []
    for path in big:
        with Image.open(path) as im:
            assert im.size == (224, 224)
            out = root / path.parent.name / f"{path.stem}.png"
            out.parent.mkdir()
            im.convert("RGB").resize((112, 112), Image.Resampling.BICUBIC).save(out)
        small.append(out)
    return big, small


@pytest.fixture(scope="module")
def demo_classifier():
    from pathvlm.zeroshot import ZeroShotClassifier

    encoder, transform = create_encoder(DEMO, device="cpu")
    assert encoder.tile_mpp is not None
    return ZeroShotClassifier(encoder, prompts="crc_tissue", transform=transform, progress=False)


def test_crc_tile_at_its_own_scale_matches_the_tile_resized_by_hand(crc_pairs, demo_classifier):
    big, small = crc_pairs
    clf = demo_classifier
    at_half = clf.predict(big, mpp=0.5)
    at_one = clf.predict(small, mpp=1.0)
    assert at_half.notes == at_one.notes == []
    # KNOWN GAP: with the retrained encoder (112 px tiles upsampled to a 224 px input) one
    # borderline tile (MUS) flips to STR. Reading at the input's resolution instead would skip the
    # down-then-up resample but feeds 0.5 um/px detail the encoder never trained on: on 58 sharp
    # tiles it changes 22% of the labels (scripts/resample_check.py, MODEL_CARD.md). All but one agree.
    agree = sum(a == b for a, b in zip(at_half.labels, at_one.labels))
    assert agree >= len(big) - 1, (at_half.labels, at_one.labels)
    emb_half = clf.embed_images(big, mpp=0.5)
    emb_one = clf.embed_images(small, mpp=1.0)
    cos = (emb_half * emb_one).sum(-1)
    assert cos.min() >= 0.95, cos
    # control: read without its pixel size the 0.5 um/px tile is cut at native scale and drifts
    cos_native = (clf.embed_images(big) * emb_one).sum(-1)
    assert cos_native.min() < cos.min()
    unknown = clf.predict(big[:2])
    assert unknown.notes and f"assumed {clf.tile_mpp:g} um/px" in unknown.notes[0]
    assert unknown.to_dict()["predictions"][0]["mpp_assumed"] is True


def test_cli_zeroshot_and_eval_take_mpp(crc_pairs, tmp_path, capsys):
    big, small = crc_pairs
    model = f"encoder:{DEMO}"
    assert main(["-q", "zeroshot", *map(str, big), "--prompts", "crc_tissue", "--model", model,
                 "--mpp", "0.5", "--json"]) == 0
    out = capsys.readouterr()
    half = json.loads(out.out)
    assert half["notes"] == [] and "note:" not in out.err
    assert main(["-q", "zeroshot", *map(str, small), "--prompts", "crc_tissue", "--model", model,
                 "--mpp", "1.0", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in half["predictions"]] == [p["label"] for p in one["predictions"]]
    assert all(p["mpp"] == 0.5 and not p["mpp_assumed"] for p in half["predictions"])
    assert main(["-q", "zeroshot", str(big[0]), "--prompts", "crc_tissue", "--model", model]) == 0
    assert "note: pixel size unknown" in capsys.readouterr().err

    # eval: a CSV 'mpp' column wins over --mpp; rows without one take the flag
    rows = [(p, p.parent.name, "0.5") for p in big] + [(p, p.parent.name, "") for p in small]
    index = tmp_path / "index.csv"
    with index.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "mpp"), *rows])
    assert main(["-q", "eval", "zeroshot", "--data", str(index), "--prompts", "crc_tissue",
                 "--model", model, "--mpp", "1.0", "--n-boot", "10",
                 "--json", str(tmp_path / "zs.json")]) == 0
    result = json.loads((tmp_path / "zs.json").read_text())
    assert result["scale"]["images_with_mpp"] == len(rows) and result["notes"] == []
    with (tmp_path / "zs_predictions.csv").open() as f:
        predicted = [r["predicted"] for r in csv.DictReader(f)]
    n = len(big)
    assert predicted[:n] == predicted[n:] == [p["label"] for p in half["predictions"]]
    assert main(["-q", "eval", "linear-probe", "--train", str(index), "--test", str(index),
                 "--model", model, "--n-boot", "10", "--mpp", "1.0",
                 "--json", str(tmp_path / "lp.json")]) == 0
    probe = json.loads((tmp_path / "lp.json").read_text())
    assert probe["scale"]["tile_mpp"] is not None and probe["notes"] == []
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label,mpp\n{big[0]},ADI,-1\n{big[1]},BACK,\n")
    assert main(["-q", "eval", "zeroshot", "--data", str(bad), "--prompts", "crc_tissue",
                 "--model", model]) == 2
    assert "line 2: mpp must be a positive number" in capsys.readouterr().err


def test_app_open_takes_a_pixel_size_and_says_what_it_assumed(tiny_model, tmp_path):
    from pathvlm.ui.handlers import Handlers
    from pathvlm.ui.state import Session

    _noise(256, 128).save(tmp_path / "photo.png")
    h = Handlers(tiny_model, max_new_tokens=2)
    session, _info, _, _, status = h.open(str(tmp_path / "photo.png"), None, "H&E", Session())
    assert "pixel size unknown for photo" in status and "assumed 2 um/px" in status
    assert len(h.active(session).bag) == 32  # 8 x 4 native 32 px tiles
    session, _, _, _, status = h.open(str(tmp_path / "photo.png"), None, "H&E", Session(), mpp=0.5)
    prepared = h.active(session)
    assert "pixel size unknown" not in status and len(prepared.bag) == 2  # 128 px of image a tile
    assert prepared.extent == 128
    _, _, _, _, status = h.open(str(tmp_path / "photo.png"), None, "H&E", Session(), mpp=-1)
    assert status.startswith("Could not open photo.png") and "positive" in status


def test_app_opens_a_case_without_its_unreadable_slide_and_says_so(tiny_model, tmp_path):
    from pathvlm.ui.handlers import Handlers
    from pathvlm.ui.state import Session

    _noise(128, 64).save(tmp_path / "a.png")
    _noise(64, 64, seed=1).save(tmp_path / "coarse.png")
    (tmp_path / "case.yaml").write_text("id: c5\nslides:\n  - {path: coarse.png, stain: H&E, mpp: 20}\n"
                                        "  - {path: a.png, stain: H&E, mpp: 0.5}\n")
    from pathvlm.ui.deploy import DeployConfig

    h = Handlers(tiny_model, max_new_tokens=2, deploy=DeployConfig(slide_roots=(tmp_path,)))
    session, _, _, _, status = h.open(None, str(tmp_path / "case.yaml"), None, Session())
    assert status.startswith("Opened case case (1 slides)")
    assert "slide coarse left out of case c5: scanned at 20 um/px" in status
    assert str(tmp_path) not in status  # the reason, not the server path
    assert [s.name for s in session.slides] == ["a"] and session.active == 0
    report = h.report("colorectal_biopsy", None, None, None, None, None, session)
    assert "slide coarse left out of case c5" in report[0]  # the draft's flags name it
    (tmp_path / "none.yaml").write_text("id: c6\nslides:\n  - {path: coarse.png, mpp: 20}\n")
    _, _, _, _, status = h.open(None, str(tmp_path / "none.yaml"), None, Session())
    assert status.startswith("Could not open none.yaml") and "no slide could be read" in status


def test_resample_check_compares_the_real_routes_on_train_tiles(shared_data):
    """scripts/resample_check.py: a bicubic 224 px copy fed straight to the 224 px input is what the
    encoder transform makes of the thumbnail itself, so only the --mpp route can move it."""
    from conftest import load_script

    check = load_script("resample_check")
    if not (shared_data / check.CMU).is_file():
        pytest.skip(f"{shared_data / check.CMU} is missing")
    r = check.run(shared_data, f"encoder:{DEMO}", limit=4)
    assert (r["soft_tiles"], r["sharp_tiles"]) == (4, 4)
    assert r["tile_mpp"] == 1.0 and r["tile_size"] == 112
    soft = r["soft"]
    assert soft["native (reference)"]["cosine_min"] > 0.9999
    assert soft["224 px copy fed to the input directly"]["cosine_min"] > 0.999
    routed = soft["224 px copy, --mpp 0.5 (resampled to the tile scale)"]
    assert 0.5 < routed["cosine_min"] < 0.9999  # resampled down and up again: close, not equal
    assert 0 <= routed["balanced_accuracy"] <= 1
    assert 0 <= r["sharp"]["fed to the input directly"]["label_agreement"] <= 1


def test_resample_check_names_missing_data(tmp_path, capsys):
    from conftest import load_script

    check = load_script("resample_check")
    assert check.main(["--data", str(tmp_path)]) == 2
    assert f"{tmp_path}: missing crc_tiles/index.csv, wsi/CMU-1-Small-Region.svs" in capsys.readouterr().err
