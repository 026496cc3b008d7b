"""Calibration (temperature / Platt, ECE, thresholds), the calibrated scorer and `pathvlm calibrate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pathvlm.calibration import (
    Calibration,
    HeadCalibration,
    choose_threshold,
    ece,
    fit_platt,
    fit_temperature,
    global_threshold,
    load_calibration,
    selective,
    softmax,
)
from pathvlm.errors import ConfigError
from pathvlm.model import ModelConfig, build_model
from pathvlm.reports.tables import ENTITY_PANELS
from pathvlm.scoring import HEADS, Scorer, differential, get_scorer, score

TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(encoder="openclip:pathvlm-tiny", n_tokens=4, hidden_dim=32,
                                   llm_config=TINY_LLM, max_case_tokens=8, tile_mpp=4.0,
                                   tile_size=64))


def test_fit_temperature_recovers_the_generating_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(logits / 2.5)])
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    # calibrated at the true temperature, overconfident at T = 1
    conf_true = softmax(logits / 2.5).max(1)
    conf_raw = softmax(logits).max(1)
    hits_true = softmax(logits / 2.5).argmax(1) == labels
    assert ece(conf_true, hits_true) < 0.03 < ece(conf_raw, hits_true)


def test_fit_platt_recovers_slope_and_bias():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 6000)
    y = (rng.random(6000) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(float)
    a, b = fit_platt(z, y)
    assert a == pytest.approx(0.5, abs=0.08) and b == pytest.approx(-1.0, abs=0.15)


def test_platt_never_reaches_one_on_separable_data():
    z = np.array([-3.0, -2, -1, 1, 2, 3])
    y = np.array([0, 0, 0, 1, 1, 1])
    a, b = fit_platt(z, y)
    p = 1 / (1 + np.exp(-(a * z + b)))
    assert p.max() < 0.95 and p.min() > 0.05  # six samples do not earn 0.99


def test_selective_and_thresholds():
    conf = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4])
    corr = np.array([1, 1, 1, 1, 1, 0, 1, 0])
    assert selective(conf, corr, 0.8) == (0.5, 1.0, 4)
    assert selective(conf, corr, None) == (0.0, None, 0)
    assert choose_threshold(conf, corr, target=0.9, min_support=3) == 0.7
    assert choose_threshold(conf, corr, target=0.9, min_support=6) is None  # 5/6 < 0.9 at 0.6
    assert choose_threshold(conf, corr, target=0.8, min_support=6) == 0.5  # 6/7 kept right
    # one threshold for two heads: the second head is only right at >= 0.9
    other = (np.array([0.99, 0.9, 0.88, 0.86, 0.5]), np.array([1, 1, 0, 0, 1]))
    t = global_threshold({"a": (conf, corr), "b": other}, target=0.9, min_support=2)
    assert t == 0.9


def test_calibration_file_round_trip(tmp_path):
    head = HeadCalibration("temperature", {"temperature": 2.0}, ["A", "B"], "d1", threshold=0.8)
    cal = Calibration({"lymphoma_entity": head}, 0.8, 0.9, "abc", {"data_root": "x"})
    path = cal.save(tmp_path / "sub" / "calibration.json")
    back = load_calibration(path)
    assert back.heads["lymphoma_entity"].params == {"temperature": 2.0}
    assert back.min_confidence == 0.8 and back.path == str(path)
    np.testing.assert_allclose(back.heads["lymphoma_entity"].probs(np.array([2.0, 0.0])),
                               softmax(np.array([1.0, 0.0])))
    assert not list(tmp_path.glob("sub/.*tmp*"))  # atomic: no temporary left
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="bad.json"):
        load_calibration(tmp_path / "bad.json")


def test_scorer_uncalibrated_and_shapes(model, ihc_png):
    scorer = Scorer(model, calibration=None)
    assert not scorer.calibrated and "uncalibrated" in scorer.status()["problem"]
    [s] = score(model, str(ihc_png), scorer)
    n = len(s.coords)
    assert n > 0 and set(s.heads) == set(HEADS)
    for h in s.heads.values():
        assert not h.calibrated
        assert h.tile_probs.shape == (n, len(h.classes))
        assert h.probs.sum() == pytest.approx(1.0)
    assert s.heads["node_tumor"].classes == ["absent", "present"]
    # the composition head's slide probabilities are the mean of its tile probabilities
    np.testing.assert_allclose(s.heads["crc_tissue"].probs, s.heads["crc_tissue"].tile_probs.mean(0))
    ddx = differential([s])
    assert [p for _, p in ddx] == sorted((p for _, p in ddx), reverse=True)
    assert {e for e, _ in ddx} <= set(ENTITY_PANELS)


def _calibration_for(scorer: Scorer, model, temperature: float = 4.0) -> Calibration:
    heads = {}
    for name, spec in HEADS.items():
        if spec.binary:
            heads[name] = HeadCalibration("platt", {"a": 0.5, "b": 0.0}, ["absent", "present"],
                                          scorer.prompts_digest(name))
        else:
            classes = scorer.classifiers[spec.prompts].classes
            heads[name] = HeadCalibration("temperature", {"temperature": temperature}, classes,
                                          scorer.prompts_digest(name))
    return Calibration(heads, 0.6, 0.9, model.encoder.weights_hash)


def test_scorer_applies_calibration_and_rejects_other_weights(model, ihc_png):
    raw = Scorer(model, calibration=None)
    cal = _calibration_for(raw, model)
    scorer = Scorer(model, calibration=cal)
    assert scorer.calibrated and scorer.status()["min_confidence"] == 0.6
    [a] = score(model, str(ihc_png), raw)
    [b] = score(model, str(ihc_png), scorer)
    ha, hb = a.heads["lymphoma_entity"], b.heads["lymphoma_entity"]
    assert hb.calibrated
    np.testing.assert_allclose(hb.probs, softmax(ha.logits / 4.0))
    assert hb.probs.max() < ha.probs.max()  # T > 1 flattens
    other = Calibration(cal.heads, 0.6, 0.9, "not-this-encoder")
    stale = Scorer(model, calibration=other)
    assert not stale.calibrated and "re-run `pathvlm calibrate`" in stale.status()["problem"]
    # a head fitted on other prompts is ignored, the others still apply
    cal.heads["crc_tumor"].prompts_digest = "other-prompts"
    [c] = score(model, str(ihc_png), Scorer(model, calibration=cal))
    assert not c.heads["crc_tumor"].calibrated and c.heads["crc_tissue"].calibrated


def test_get_scorer_follows_the_model_calibration(model):
    model.calibration = None
    first = get_scorer(model)
    assert get_scorer(model) is first and not first.calibrated
    model.calibration = _calibration_for(first, model)
    try:
        assert get_scorer(model).calibrated
    finally:
        model.calibration = None


def test_stored_prompt_embeddings_are_used(model):
    from pathvlm.zeroshot import _TEXT_CACHE

    scorer = Scorer(model, calibration=None)
    cal = _calibration_for(scorer, model)
    emb = scorer.class_embeddings("lymphoma_entity")
    fake = np.roll(emb, 1, axis=0)  # stored rows differ from what the text tower gives
    cal.heads["lymphoma_entity"].class_embeddings = fake.tolist()
    _TEXT_CACHE.clear()
    seeded = Scorer(model, calibration=cal)
    np.testing.assert_allclose(seeded.class_embeddings("lymphoma_entity"), fake, atol=1e-5)
    _TEXT_CACHE.clear()


def test_load_model_reads_calibration_beside_weights(model, tmp_path):
    from pathvlm.model import load_model

    run = model.save_pretrained(tmp_path / "run")
    assert load_model(run).calibration is None
    cal = _calibration_for(Scorer(model, calibration=None), model)
    cal.save(run / "calibration.json")
    loaded = load_model(run)
    assert loaded.calibration.min_confidence == 0.6 and loaded.run_dir == run
    assert get_scorer(loaded).calibrated


def _synthetic_root(tmp_path, rng):
    from PIL import Image

    root = tmp_path / "data"
    rows = {"lymphoma_nia": ["path,label,specimen,split"], "crc_tiles": ["path,label,split"],
            "pcam": ["path,label,split"]}
    colours = {"CLL": (90, 60, 160), "FL": (200, 120, 190), "MCL": (150, 90, 120),
               "TUM": (120, 40, 110), "ADI": (245, 240, 245), "LYM": (60, 40, 130),
               "tumor": (130, 50, 120), "normal": (80, 60, 150)}
    sets = {"lymphoma_nia": ["CLL", "FL", "MCL"], "crc_tiles": ["TUM", "ADI", "LYM"],
            "pcam": ["tumor", "normal"]}
    for ds, labels in sets.items():
        for label in labels:
            (root / ds / label).mkdir(parents=True)
            for i in range(6):
                arr = np.clip(np.array(colours[label]) + rng.normal(0, 20, (72, 72, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(root / ds / label / f"{i}.png")
                spec = f",{label}-s{i % 2}" if ds == "lymphoma_nia" else ""
                rows[ds].append(f"{label}/{i}.png,{label}{spec},val")
        (root / ds / "index.csv").write_text("\n".join(rows[ds]) + "\n")
    return root


def test_cli_calibrate_writes_file_beside_weights(model, tmp_path):
    from pathvlm.cli import main
    from pathvlm.model import load_model

    root = _synthetic_root(tmp_path, np.random.default_rng(0))
    run = model.save_pretrained(tmp_path / "run")
    assert main(["-q", "calibrate", "--model", str(run), "--data", str(root)]) == 0
    cal = load_calibration(run / "calibration.json")
    assert set(cal.heads) == set(HEADS)
    for name, head in cal.heads.items():
        m = head.metrics
        assert m["in_sample"]["n"] == (12 if name == "node_tumor" else 18)
        assert 0.0 <= m["in_sample"]["ece"] <= 1.0 and "ece" in m["cross_fit"]
        assert len(head.class_embeddings) == len(head.classes if not HEADS[name].binary
                                                 else Scorer(model).classifiers[
                                                     HEADS[name].prompts].classes)
    assert cal.encoder_weights_hash == model.encoder.weights_hash
    assert load_model(run).calibration is not None
    # missing data root: one clear error
    assert main(["-q", "calibrate", "--model", str(run), "--data", str(tmp_path / "nope")]) == 2


def test_top_label_isotonic_keeps_ranks_and_never_earns_one_from_few():
    from pathvlm.calibration import fit_top_label_isotonic, top_label_map

    rng = np.random.default_rng(2)
    probs = softmax(rng.normal(0, 2, (200, 4)))
    correct = rng.random(200) < 0.5  # confidence says nothing about correctness
    xs, ys = fit_top_label_isotonic(probs.max(1), correct)
    mapped = top_label_map(probs, xs, ys)
    np.testing.assert_allclose(mapped.sum(1), 1.0)
    assert (mapped.argmax(1) == probs.argmax(1)).all()
    assert ece(mapped.max(1), correct) < ece(probs.max(1), correct)
    xs, ys = fit_top_label_isotonic(np.array([0.6, 0.7, 0.8, 0.9]), np.ones(4))
    assert max(ys) == pytest.approx(5 / 6)  # four right answers: (4 + 1) / (4 + 2)


def test_eval_report_suite_matches_the_calibration(model, tmp_path):
    """`pathvlm eval report --data ROOT` measures each field from drafted reports; on the set it
    was fitted on it reproduces calibrate's in-sample coverage at the same threshold."""
    from pathvlm.cli import main

    root = _synthetic_root(tmp_path, np.random.default_rng(3))
    run = model.save_pretrained(tmp_path / "run")
    assert main(["-q", "calibrate", "--model", str(run), "--data", str(root)]) == 0
    cal = load_calibration(run / "calibration.json")
    out = tmp_path / "eval" / "fields.json"
    assert main(["-q", "eval", "report", "--model", str(run), "--data", str(root),
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["min_confidence"] == pytest.approx(cal.min_confidence)
    from pathvlm.model import load_model
    from pathvlm.provenance import model_weights_hash

    assert result["weights_hash"] and result["weights_hash"] == model_weights_hash(load_model(run))
    fields = result["fields"]
    assert set(fields) == {"lymphoma entity", "colorectal tissue composition",
                           "carcinoma present", "tumour in a lymph node"}
    for m in fields.values():
        ins = cal.heads[m["head"]].metrics["in_sample"]
        assert m["n"] == ins["n"] and 0.0 <= m["coverage"] <= 1.0
        assert abs(m["coverage"] - ins["coverage"]) <= 1.0 / m["n"] + 1e-9, m["head"]
        assert m["cross_fit"] == cal.heads[m["head"]].metrics["cross_fit"]
    assert "coverage" in out.with_suffix(".md").read_text()
