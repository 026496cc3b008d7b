"""Report schemas: registry, field tables, round trips, provenance enforcement, pT/pN derivation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from report_helpers import NOW, findings, first_option, tumour_slide

from pathvlm.cli import main
from pathvlm.errors import ConfigError
from pathvlm.reports import (
    Assess,
    ImageFindings,
    Reason,
    Source,
    draft_report,
    get_report_type,
    list_report_types,
    report_json_schema,
    report_model,
    validate_report,
)
from pathvlm.reports.derive import derive_pn, derive_pt

DOMAIN = Path(__file__).resolve().parents[2] / "shared" / "domain" / "report_fields.md"
TYPES = list_report_types()


def test_registry_lists_the_three_types():
    assert TYPES == ["colorectal_resection", "colorectal_biopsy", "lymphoma"]
    with pytest.raises(ConfigError, match="unknown report type"):
        get_report_type("prostate")


@pytest.mark.parametrize("kind", TYPES)
def test_json_schema_has_every_field_with_its_values(kind):
    schema = report_json_schema(kind)
    fields_ref = schema["properties"]["fields"]["$ref"].split("/")[-1]
    props = schema["$defs"][fields_ref]["properties"]
    rtype = get_report_type(kind)
    assert sorted(props) == sorted(rtype.field_names)
    for spec in rtype.fields:
        entry = schema["$defs"][props[spec.name]["$ref"].split("/")[-1]]
        assert entry["x-assess"] == spec.assess.value
        text = json.dumps(entry["properties"]["value"])
        for v in spec.values:  # every allowed value is in the schema's enum
            assert json.dumps(v)[1:-1] in text
        reasons = set(schema["$defs"]["Reason"]["enum"])
        assert reasons == {r.value for r in Reason}


def _doc_table_fields(section: str) -> list[str]:
    text = DOMAIN.read_text()
    body = text.split(section, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    names = []
    for line in body.splitlines():
        cell = line.split("|")[1].strip() if line.startswith("|") else ""
        if cell and cell not in ("field", "---") and not set(cell) <= {"-"}:
            names += [c.strip() for c in cell.split(",")]
    return names


@pytest.mark.skipif(not DOMAIN.exists(), reason=f"{DOMAIN} not present")
def test_fields_match_the_domain_reference():
    resection = set(get_report_type("colorectal_resection").field_names)
    assert set(_doc_table_fields("### A1.")) <= resection
    lymphoma = set(get_report_type("lymphoma").field_names)
    doc = set(_doc_table_fields("## B. Lymphoma"))
    # the list-valued differential is a top-level key; the per-gene rearrangement row is split
    doc -= {"morphologic_differential", "myc_bcl2_bcl6_rearrangement"}
    assert doc <= lymphoma
    assert {"myc_rearrangement", "bcl2_rearrangement", "bcl6_rearrangement"} <= lymphoma


def test_biopsy_never_has_ptnm_and_biomarkers_are_ancillary():
    biopsy = get_report_type("colorectal_biopsy")
    assert not {"pT", "pN", "pM"} & set(biopsy.field_names)
    for kind in ("colorectal_resection", "colorectal_biopsy"):
        rtype = get_report_type(kind)
        for name in ("mlh1_ihc", "msi_status", "braf_v600e", "kras_status", "her2_ihc"):
            assert rtype.spec(name).assess == Assess.ANC
    assert "morphologic_differential" in report_model("lymphoma").model_fields
    assert "morphologic_differential" not in report_model("colorectal_biopsy").model_fields


@pytest.mark.parametrize("kind", TYPES)
def test_round_trip_json(kind):
    report = draft_report(findings(), kind, now=NOW)
    data = json.loads(json.dumps(report.to_json_dict()))
    again = validate_report(data)
    assert again.to_json_dict() == data
    assert data["draft"] is True and data["banner"] == "DRAFT - requires review by a pathologist"
    for entry in data["fields"].values():
        assert ("value" in entry) != ("reason" in entry)
        assert {"confidence", "evidence", "source"} <= set(entry)


def _good(kind="lymphoma"):
    return draft_report(findings(), kind, now=NOW).to_json_dict()


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f["lineage"].update(value="B-cell", source="image", reason=None),
     "cannot come from source 'image'"),
    (lambda f: f["procedure"].update(value="Excisional biopsy", source="image", reason=None),
     "cannot come from source 'image'"),
    (lambda f: f["necrosis"].update(value="Maybe"), "necrosis"),
    (lambda f: f["necrosis"].update(reason="not_applicable"), "exactly one of"),
    (lambda f: f["lineage"].pop("reason"), "exactly one of"),
    (lambda f: f["lineage"].update(reason="because"), "reason"),
    (lambda f: f["mitotic_activity"].update(confidence=1.5), "confidence"),
])
def test_schema_rejects_bad_entries(mutate, message):
    data = _good()
    mutate(data["fields"])
    with pytest.raises(ValidationError, match=re.escape(message)):
        validate_report(data)


def test_neuroendocrine_type_needs_ancillary_not_image():
    data = _good("colorectal_resection")
    data["fields"]["histologic_type"].update(value="Small cell neuroendocrine carcinoma")
    with pytest.raises(ValidationError, match="needs ancillary confirmation"):
        validate_report(data)
    report = draft_report(ImageFindings([tumour_slide(tum=0.0, muc=0.0)], choose=lambda s, q, o:
                                        "Small cell neuroendocrine carcinoma"),
                          "colorectal_resection")
    entry = report.fields.histologic_type
    assert entry.value is None and "ancillary confirmation" in entry.note


# --- property: whatever the model says, ANC and GC fields never come from the image ---

_raw = st.one_of(st.none(), st.text(max_size=20), st.integers(-5, 50),
                 st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                 st.lists(st.text(max_size=8), max_size=3),
                 st.sampled_from(["B-cell", "Mantle cell lymphoma", "MSI-H", "Rectum", "pT3",
                                  "Loss of nuclear expression", "Present", "G2 moderately"]))
_ALL_FIELDS = sorted({n for k in TYPES for n in get_report_type(k).field_names})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(TYPES),
       proposals=st.dictionaries(st.sampled_from(_ALL_FIELDS), _raw, max_size=25),
       answers=st.lists(_raw, min_size=1, max_size=5))
def test_property_ancillary_and_clinical_fields_never_from_image(kind, proposals, answers):
    calls = iter(answers * 200)
    f = ImageFindings([tumour_slide()], proposals=proposals, choose=lambda s, q, o: next(calls))
    report = draft_report(f, kind)
    rtype = get_report_type(kind)
    for spec in rtype.fields:
        entry = getattr(report.fields, spec.name)
        if spec.assess == Assess.ANC:
            assert entry.value is None and entry.reason == Reason.requires_ancillary_testing
        if spec.assess == Assess.GC:
            assert entry.value is None
        if entry.value is not None:
            assert entry.source in spec.sources
            assert spec.coerce(entry.value) == entry.value
    validate_report(report.to_json_dict())


def test_corrupt_model_output_is_reasked_once_then_abstains():
    calls = []

    def garbage(spec, question, options):
        calls.append(spec.name)
        return {"not": "a value"}

    report = draft_report(findings(chooser=garbage), "lymphoma")
    entry = report.fields.growth_pattern
    assert entry.value is None
    assert entry.reason == Reason.cannot_be_determined_from_submitted_tissue
    assert "invalid model output" in entry.note
    assert calls.count("growth_pattern") == 2


def test_reask_recovers_from_one_bad_answer():
    answers = {"necrosis": 1}  # necrosis: the proposal is bad, the one re-ask answers well

    def flaky(spec, question, options):
        answers[spec.name] = answers.get(spec.name, 0) + 1
        return "garbage!" if answers[spec.name] == 1 else first_option(spec, question, options)

    report = draft_report(findings(chooser=flaky, necrosis="nonsense"), "lymphoma")
    assert report.fields.predominant_cell_size.value == "Small"
    assert report.fields.predominant_cell_size.source == Source.image
    assert report.fields.necrosis.value == "Present"
    assert answers["necrosis"] == 2


def test_clinical_input_errors_name_the_field():
    with pytest.raises(ConfigError, match="unknown field.*stage_group"):
        draft_report(findings(), "colorectal_resection", clinical={"stage_group": "III"})
    with pytest.raises(ConfigError, match="tumor_size_cm"):
        draft_report(findings(), "colorectal_resection", clinical={"tumor_size_cm": "big"})
    with pytest.raises(ConfigError, match="msi_status is ANC"):
        draft_report(findings(), "colorectal_resection", clinical={"msi_status": "MSI-H"})
    with pytest.raises(ConfigError, match="pT is DER"):
        draft_report(findings(), "colorectal_resection", clinical={"pT": "pT3"})
    with pytest.raises(ConfigError, match="unknown field.*pT"):
        draft_report(findings(), "colorectal_biopsy", clinical={"pT": "pT1"})


# --- AJCC 8th derivation tables ---

@pytest.mark.parametrize("extent, pt", [
    ("No invasion (high grade dysplasia)", "pTis"),
    ("Invades lamina propria/muscularis mucosae (intramucosal carcinoma)", "pTis"),
    ("Invades submucosa", "pT1"),
    ("Invades into muscularis propria", "pT2"),
    ("Invades through muscularis propria into pericolorectal tissue", "pT3"),
    ("Invades visceral peritoneum", "pT4a"),
    ("Directly invades or adheres to adjacent structure(s)", "pT4b"),
    ("No evidence of primary tumor", "pT0"),
    ("Cannot be determined", None),
    (None, None),
])
def test_pt_table(extent, pt):
    assert derive_pt(extent).value == pt


@pytest.mark.parametrize("positive, examined, deposits, pn", [
    (0, 12, "Not identified", "pN0"),
    (0, 12, "Present", "pN1c (deposits, no nodes)"),
    (0, 12, None, None),  # deposits unassessed: pN0 vs pN1c undecidable
    (0, 0, "Not identified", None),
    (1, 12, "Present", "pN1a (1 node)"),
    (2, 12, "Not identified", "pN1b (2-3)"),
    (3, 12, None, "pN1b (2-3)"),
    (4, 12, None, "pN2a (4-6)"),
    (6, 12, None, "pN2a (4-6)"),
    (7, 12, None, "pN2b (>=7)"),
    (15, 20, None, "pN2b (>=7)"),
    (5, 3, None, None),
    (None, 12, "Present", None),
])
def test_pn_table(positive, examined, deposits, pn):
    assert derive_pn(positive, examined, deposits).value == pn


def test_pt_pn_derived_in_report_only_from_pathologist_input():
    clinical = {"tumor_extent": "Invades visceral peritoneum", "lymph_nodes_positive_count": 4,
                "lymph_nodes_examined_count": 18}
    report = draft_report(findings(), "colorectal_resection", clinical=clinical)
    assert report.fields.pT.value == "pT4a" and report.fields.pT.source == Source.derived
    assert report.fields.pN.value == "pN2a (4-6)"
    # extent from the image only: no pT, and the note says what the image suggested
    report = draft_report(findings(chooser=lambda s, q, o: "Invades submucosa"
                                   if s.name == "tumor_extent" else first_option(s, q, o)),
                          "colorectal_resection")
    assert report.fields.tumor_extent.value == "Invades submucosa"
    assert report.fields.pT.value is None and "pT1" in report.fields.pT.note
    assert report.fields.pN.value is None


def test_cli_schema_prints_json_schema(capsys):
    assert main(["schema", "--type", "colorectal_biopsy"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["report_type"]["const"] == "colorectal_biopsy"
    with pytest.raises(SystemExit) as exc:
        main(["schema", "--type", "prostate"])
    assert exc.value.code == 2
