"""Case manifests: loading, path resolution, one clear error per problem, cases through reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_helpers import first_option

import pathvlm
from pathvlm.case import Case, CaseError, SlideRef, load_case, normalize_stain
from pathvlm.cli import main
from pathvlm.errors import ConfigError, PathVLMError
from pathvlm.reports import (
    ImageFindings,
    SlideFindings,
    draft_report,
    list_formats,
    render_report,
    validate_fhir,
    validate_report,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("he.svs", "node.tiff", "cd20.png"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def write(folder: Path, text: str, name: str = "case.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


GOOD = """
id: c1
slides:
  - {path: he.svs, stain: H&E, part: A1, role: tumor}
  - {path: node.tiff, stain: he, part: B1, role: lymph_node}
  - {path: cd20.png, stain: "ihc: CD20", part: A1}
clinical: {procedure: Sigmoidectomy, lymph_nodes_examined_count: 12}
ancillary_results:
  - {test: ihc, target: cd20, result: positive}
  - {test: PCR, target: MSI, result: value, value: MSI-H, note: outside lab}
"""


def test_load_case_resolves_paths_and_normalizes(folder):
    case = load_case(write(folder, GOOD))
    assert case.id == "c1"
    assert [s.path for s in case.slides] == [folder / "he.svs", folder / "node.tiff",
                                              folder / "cd20.png"]
    assert [s.stain for s in case.slides] == ["H&E", "H&E", "IHC:CD20"]
    assert case.slides[2].marker == "CD20" and case.slides[1].role == "lymph_node"
    assert case.ancillary_results[0].test == "IHC" and case.ancillary_results[0].target == "CD20"
    assert case.clinical["lymph_nodes_examined_count"] == 12
    as_json = write(folder, json.dumps(case.model_dump(mode="json")), "case.json")
    assert load_case(as_json) == case
    assert pathvlm.Case is Case and pathvlm.load_case is load_case


@pytest.mark.parametrize("edit, entry, problem", [
    (lambda t: t.replace("path: node.tiff", "path: missing.tiff"), "slides[1] (missing.tiff)",
     "slide file not found"),
    (lambda t: t.replace('"ihc: CD20"', "PAS"), "slides[2].stain", "unknown stain syntax 'PAS'"),
    (lambda t: t.replace('"ihc: CD20"', '"IHC:"'), "slides[2].stain", "unknown stain syntax"),
    (lambda t: t.replace("path: cd20.png", "path: he.svs"), "slides[2] (he.svs)",
     "duplicate slide"),
    (lambda t: t.replace("path: cd20.png", "path: ./sub/../he.svs"), "slides[2]",
     "duplicate slide"),
    (lambda t: t.replace("test: PCR", "test: Westernblot"), "ancillary_results[1].test",
     "unknown test 'Westernblot'"),
    (lambda t: t.replace("target: cd20", "target: CD999"), "ancillary_results[0].target",
     "unknown target 'CD999'"),
    (lambda t: t.replace("result: positive", "result: strong"), "ancillary_results[0].result",
     "Input should be"),
    (lambda t: t.replace(", value: MSI-H", ""), "ancillary_results[1]", "give 'value'"),
    (lambda t: t.replace("procedure:", "surgeon:"), "clinical", "unknown field(s) surgeon"),
    (lambda t: t.replace("role: tumor", "role: tumour"), "slides[0].role (he.svs)",
     "Input should be"),
    (lambda t: t + "\nextra_key: 1\n", "extra_key", "Extra inputs are not permitted"),
    (lambda t: t.replace("slides:", "slides: [\n"), "manifest", "invalid YAML"),
    (lambda t: "- just\n- a list\n", "manifest", "expected a mapping"),
])
def test_manifest_errors_name_file_entry_and_problem(folder, edit, entry, problem):
    path = write(folder, edit(GOOD))
    with pytest.raises(CaseError) as exc:
        load_case(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert exc.value.entry.startswith(entry), message
    assert problem in exc.value.problem, message
    assert isinstance(exc.value, ConfigError) and isinstance(exc.value, PathVLMError)


def test_missing_manifest_and_bad_json(folder):
    with pytest.raises(CaseError, match="nope.yaml: manifest: cannot read"):
        load_case(folder / "nope.yaml")
    with pytest.raises(CaseError, match="invalid JSON"):
        load_case(write(folder, "{'id': 1,", "bad.json"))


def test_stain_syntax():
    assert normalize_stain(" h&e ") == "H&E"
    assert normalize_stain("IHC:cyclin D1") == "IHC:cyclin D1"
    assert normalize_stain("Special: PAS-D") == "special:PAS-D"
    for bad in ("", "IHC", "IHC cyclin D1", "trichrome", "ISH:EBER"):
        with pytest.raises(ValueError, match="unknown stain syntax"):
            normalize_stain(bad)


def test_from_inputs_makes_a_case_of_one(folder):
    case = Case.from_inputs([folder / "he.svs"])
    assert case.id == "he" and len(case.slides) == 1 and case.slides[0].stain == "H&E"
    with pytest.raises(CaseError, match="file not found"):
        Case.from_inputs([folder / "gone.svs"])
    with pytest.raises(CaseError, match="duplicate slide"):
        Case.from_inputs([folder / "he.svs", folder / "he.svs"])


def test_case_error_is_one_cli_line(folder, capsys):
    # the CLI turns any PathVLMError into one line and exit 2; 'schema' is the command that
    # reaches library code without a model, so drive the error path through the library here
    err = CaseError(folder / "c.yaml", "slides[0]", "slide file not found")
    assert str(err).count("\n") == 0 and "c.yaml: slides[0]: slide file not found" in str(err)
    assert main(["list", "reports"]) == 0
    assert "colorectal_biopsy" in capsys.readouterr().out


@pytest.mark.parametrize("manifest, kind", [
    ("colorectal_resection_case.yaml", "colorectal_resection"), ("lymphoma_case.yaml", "lymphoma")])
def test_example_manifests(manifest, kind, shared_data, ihc_png, monkeypatch):
    monkeypatch.setenv("PATHVLM_DATA", str(shared_data))  # the examples read $PATHVLM_DATA/...
    case = load_case(REPO / "configs" / "cases" / manifest)
    assert all(s.path.is_absolute() and s.path.exists() for s in case.slides)
    assert any(s.stain.startswith("IHC:") for s in case.slides)
    report = draft_report(ImageFindings([SlideFindings(s.name) for s in case.slides]), kind,
                          case=case)
    data = report.to_json_dict()
    assert data["case_id"] == case.id and len(data["slides"]) == len(case.slides)
    filled_from_results = [n for n, e in data["fields"].items()
                           if e.get("source") == "ancillary_result"]
    assert filled_from_results  # the entered results reach the report
    assert validate_report(data).to_json_dict() == data


def test_three_slide_case_from_shared_fixtures(tmp_path, wsi_dir, ihc_png):
    manifest = {
        "id": "fixture-case",
        "slides": [
            {"path": str(wsi_dir / "CMU-1-Small-Region.svs"), "stain": "H&E", "role": "tumor"},
            {"path": str(wsi_dir / "CMU-1-Small-Region-pyramid.tiff"), "stain": "H&E",
             "role": "lymph_node", "part": "B1"},
            {"path": str(ihc_png), "stain": "IHC:MLH1"},
        ],
        "clinical": {"tumor_extent": "Invades into muscularis propria",
                     "lymph_nodes_positive_count": 1, "lymph_nodes_examined_count": 15},
        "ancillary_results": [{"test": "IHC", "target": "MLH1", "result": "loss"}],
    }
    case = load_case(write(tmp_path, json.dumps(manifest), "case.json"))
    slides = [SlideFindings("CMU-1-Small-Region", tissue_fractions={"TUM": 0.5, "STR": 0.5},
                            top_tiles=[(1000, 1200)]),
              SlideFindings("CMU-1-Small-Region-pyramid", tissue_fractions={"TUM": 0.1,
                                                                            "LYM": 0.9}),
              SlideFindings("ihc", tissue_fractions={"TUM": 1.0})]
    report = draft_report(ImageFindings(slides, choose=first_option), "colorectal_resection",
                          case=case)
    f = report.fields
    assert (f.pT.value, f.pN.value, f.mmr_status.value) == ("pT2", "pN1a (1 node)",
                                                            "MMR-deficient")
    assert f.regional_lymph_node_status.evidence[0].slide == "CMU-1-Small-Region-pyramid"
    assert f.tumor_cell_percent.value == 50.0  # the IHC image's pixels are not read
    for fmt in list_formats():
        text = render_report(report, fmt)
        if fmt == "fhir":
            assert validate_fhir(json.loads(text)) == []
            assert json.loads(text)["subject"] == {"display": "case fixture-case"}
    assert SlideRef(path=ihc_png, stain="IHC:MLH1").name == "ihc"
