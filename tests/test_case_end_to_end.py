"""A three-slide lymphoma case (two H&E parts and a cyclin D1 immunostain) through `pathvlm ask`
and `pathvlm report`, offline, on a tiny random PathVLM. Structure and provenance are checked;
the random weights say nothing about accuracy."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pathvlm.cli import main
from pathvlm.model import ModelConfig, build_model
from pathvlm.reports import validate_report
from pathvlm.reports.fields import Assess
from pathvlm.reports.schemas import get_report_type

TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
CONTRACT = ("report_type", "draft", "fields", "morphologic_differential", "narrative", "model",
            "generated_at")
CASE_KEYS = ("case_id", "slides", "ancillary_results")
MCL = "Mantle cell lymphoma"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # 64 px tiles at 4 um/px: a couple of dozen tiles per CMU slide keeps the test fast
    return build_model(ModelConfig(encoder="openclip:pathvlm-tiny", n_tokens=4, hidden_dim=32,
                                   llm_config=TINY_LLM, max_case_tokens=12, tile_mpp=4.0,
                                   tile_size=64))


@pytest.fixture
def case_file(wsi_dir, ihc_png, tmp_path):
    svs, tiff = wsi_dir / "CMU-1-Small-Region.svs", wsi_dir / "CMU-1-Small-Region-pyramid.tiff"
    for p in (svs, tiff):
        if not p.is_file():
            pytest.skip(f"{p} missing")
    manifest = {
        "id": "case-e2e",
        "slides": [{"path": str(svs), "stain": "H&E", "part": "A"},
                   {"path": str(tiff), "stain": "H&E", "part": "B"},
                   {"path": str(ihc_png), "stain": "IHC:cyclin D1", "part": "A"}],
        "ancillary_results": [{"test": "IHC", "target": "cyclin D1", "result": "positive"},
                              {"test": "IHC", "target": "CD5", "result": "positive"}],
    }
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


@pytest.fixture
def cli_model(model, monkeypatch):
    import pathvlm.model

    monkeypatch.setattr(pathvlm.model, "load_model", lambda name, **kwargs: model)
    return model


def test_case_ask_and_report(cli_model, case_file, tmp_path, capsys):
    # a case-fact question is answered from the manifest (pathvlm.chat), not from the pixels
    rc = main(["-q", "ask", str(case_file), "Which slide shows the immunostain?", "--model", "tiny"])
    assert rc == 0 and capsys.readouterr().out.strip() == \
        "The immunostain or special stain is ihc (IHC:cyclin D1, part A)."
    assert cli_model.last_attention == []
    rc = main(["-q", "ask", str(case_file), "Describe this case.", "--model",
               "tiny", "--max-new-tokens", "4"])
    assert rc == 0
    names = [a["name"] for a in cli_model.last_attention]
    assert names == ["CMU-1-Small-Region", "CMU-1-Small-Region-pyramid", "ihc"]
    assert all(a["attention"].shape[-1] == len(a["coords"]) > 0 for a in cli_model.last_attention)

    out = tmp_path / "report.json"
    rc = main(["-q", "report", str(case_file), "--type", "lymphoma", "--model", "tiny",
               "--out", str(out), "--narrative-tokens", "6"])
    assert rc == 0
    data = json.loads(out.read_text())
    validate_report(data)
    for key in CONTRACT + CASE_KEYS:
        assert key in data, key
    assert data["draft"] is True and data["case_id"] == "case-e2e"
    assert [s["stain"] for s in data["slides"]] == ["H&E", "H&E", "IHC:cyclin D1"]

    # the WHO entity comes from the entered results, and says which
    who = data["fields"]["who_haem5_diagnosis"]
    assert who["value"] == MCL and who["source"] == "ancillary_result"
    assert "cyclin D1" in who["note"]
    # morphology comes from the H&E slides only, with slide names and level-0 tiles as evidence
    he = {"CMU-1-Small-Region", "CMU-1-Small-Region-pyramid"}
    rtype = get_report_type("lymphoma")
    morph = [s.name for s in rtype.fields if s.assess == Assess.HE
             and data["fields"][s.name].get("value") is not None]
    # the tiny test model has no calibration: nothing is filled from pixels, every H&E field
    # abstains with a reason instead (a calibrated model fills those that clear min_confidence)
    abstained = [s.name for s in rtype.fields if s.assess == Assess.HE
                 and data["fields"][s.name].get("value") is None]
    assert abstained and all(data["fields"][n].get("reason") for n in abstained)
    for name in morph:
        entry = data["fields"][name]
        assert entry["source"] == "image"
        assert {e["slide"] for e in entry["evidence"]} == he
        assert all(e["tiles"] for e in entry["evidence"])
    for name, entry in data["fields"].items():
        if entry.get("value") is not None:
            assert entry["source"] in ("image", "ancillary_result", "clinical", "derived"), name
    diff = {d["entity"]: d for d in data["morphologic_differential"]}
    assert MCL in diff and diff[MCL]["supported_by"]
