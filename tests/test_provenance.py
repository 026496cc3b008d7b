"""Provenance (version, weights hash, git commit) in run dirs, feature files and reports."""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from report_helpers import NOW, findings
from test_train_loop import ToyTask, _cfg
from test_vlm import tiny_config

from pathvlm import __version__
from pathvlm import provenance as prov
from pathvlm.features import load_features, write_features
from pathvlm.model import build_model, load_model
from pathvlm.reports import draft_report, render_report, validate_fhir, validate_report
from pathvlm.reports.fhir import PROVENANCE_URL
from pathvlm.train.loop import run_training

COMMIT = re.compile(r"^[0-9a-f]{40}(\+dirty)?$")


def test_git_commit_only_from_a_checkout(monkeypatch):
    assert COMMIT.match(prov.git_commit() or ""), prov.git_commit()  # tests run in a checkout
    prov.git_commit.cache_clear()
    monkeypatch.setattr(prov, "checkout_root", lambda: None)  # as an installed wheel sees it
    try:
        assert prov.git_commit() is None
        assert set(prov.provenance()) == {"pathvlm_version"}  # unknown keys are absent, not ""
    finally:
        prov.git_commit.cache_clear()


def test_weights_hash_covers_weight_files_only(tmp_path):
    assert prov.hash_weight_files(tmp_path) is None
    (tmp_path / "adapter").mkdir()
    (tmp_path / "a.safetensors").write_bytes(b"one")
    (tmp_path / "adapter" / "b.safetensors").write_bytes(b"two")
    first = prov.hash_weight_files(tmp_path)
    assert re.match(r"^[0-9a-f]{16}$", first)
    (tmp_path / "checkpoints" / "step_1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_1" / "model.safetensors").write_bytes(b"state")
    (tmp_path / "metrics.csv").write_text("step\n1\n")
    assert prov.hash_weight_files(tmp_path) == first
    (tmp_path / "adapter" / "b.safetensors").write_bytes(b"tw0")
    assert prov.hash_weight_files(tmp_path) != first


class SafetensorsTask(ToyTask):
    def save_final(self, out_dir):
        from safetensors.torch import save_model

        save_model(self.model, str(out_dir / "toy.safetensors"))


def test_training_run_dir_meta(tmp_path):
    out = run_training(_cfg(tmp_path / "run", steps=3, eval_every=0, save_every=3), SafetensorsTask)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pathvlm_version"] == __version__ and COMMIT.match(meta["git_commit"])
    assert meta["weights_hash"] == prov.hash_weight_files(out) and "git_sha" not in meta


def test_model_dir_and_loaded_model_carry_the_weights_hash(tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config())
    run = model.save_pretrained(tmp_path / "run")
    meta = json.loads((run / "meta.json").read_text())
    assert meta["weights_hash"] == prov.hash_weight_files(run) == model.weights_hash
    loaded = load_model(run)
    assert loaded.weights_hash == meta["weights_hash"]
    assert prov.provenance(loaded)["weights_hash"] == meta["weights_hash"]


def test_feature_files_record_version_and_commit(tmp_path):
    path = write_features(tmp_path / "s.h5", np.zeros((2, 4), np.float32), np.zeros((2, 2), np.int64),
                          {"encoder": "e", "encoder_weights_hash": "abc", "pathvlm_version": "9.9"})
    attrs = load_features(path).attrs
    assert COMMIT.match(attrs["git_commit"]) and attrs["encoder_weights_hash"] == "abc"
    assert attrs["pathvlm_version"] == "9.9"  # the caller's own value is kept


def test_reports_carry_provenance_in_every_format():
    f = findings()
    f.weights_hash = "0123456789abcdef"
    report = draft_report(f, "lymphoma", now=NOW)
    data = json.loads(render_report(report, "json"))
    assert data["provenance"]["weights_hash"] == "0123456789abcdef"
    assert data["provenance"]["pathvlm_version"] == __version__
    assert COMMIT.match(data["provenance"]["git_commit"])
    assert validate_report(data).to_json_dict() == data
    md = render_report(report, "md")
    assert "weights_hash `0123456789abcdef`" in md and f"pathvlm_version `{__version__}`" in md
    fhir = json.loads(render_report(report, "fhir"))
    assert validate_fhir(fhir) == []
    (ext,) = [e for e in fhir["extension"] if e["url"] == PROVENANCE_URL]
    assert {e["url"]: e["valueString"] for e in ext["extension"]} == data["provenance"]


def test_report_without_a_model_has_no_weights_hash():
    data = draft_report(findings(), "colorectal_biopsy", now=NOW).to_json_dict()
    assert "weights_hash" not in data["provenance"] and data["provenance"]["pathvlm_version"]


def test_drafting_from_a_model_records_its_hash(tmp_path):
    from test_vlm import bag

    from pathvlm.reports.from_model import FindingsConfig

    torch.manual_seed(0)
    model = load_model(build_model(tiny_config()).save_pretrained(tmp_path / "run"))
    report = model.draft_report(bag(12), "colorectal_resection", findings_config=FindingsConfig(
        llm_fields=False, narrative_tokens=0))
    assert report.to_json_dict()["provenance"]["weights_hash"] == model.weights_hash
