"""Renderers (JSON, Markdown, FHIR R4) on every report type, the FHIR structural rules, narrative."""

from __future__ import annotations

import copy
import json

import pytest
from report_helpers import NOW, findings

from pathvlm.errors import ConfigError
from pathvlm.reports import (
    BANNER,
    ImageFindings,
    draft_report,
    get_report_type,
    list_formats,
    list_report_types,
    render_report,
    to_fhir,
    validate_fhir,
    validate_report,
)
from pathvlm.reports.fhir import DAR, REASON_TO_DAR

TYPES = list_report_types()
CLINICAL = {
    "colorectal_resection": {"procedure": "Sigmoidectomy", "tumor_size_cm": 4.5,
                             "lymph_nodes_examined_count": 12, "lymph_nodes_positive_count": 0},
    "colorectal_biopsy": {"polyp_size_cm": 1.2, "tumor_site": ["Rectum"]},
    "lymphoma": {"tumor_site": "left axilla", "procedure": "Core needle biopsy"},
}


@pytest.fixture(params=TYPES)
def report(request):
    return draft_report(findings(), request.param, clinical=CLINICAL[request.param], now=NOW)


def test_every_format_is_listed():
    assert list_formats() == ["json", "md", "fhir"]
    with pytest.raises(ConfigError, match="unknown report format 'pdf'"):
        render_report(draft_report(findings(), "lymphoma"), "pdf")


def test_json_renderer_keeps_the_contract(report):
    data = json.loads(render_report(report, "json"))
    assert {"report_type", "draft", "fields", "narrative", "model", "generated_at",
            "banner"} <= set(data)
    assert data["draft"] is True and data["banner"] == BANNER
    assert data["generated_at"] == NOW.isoformat() and data["model"] == "test-model"
    assert ("morphologic_differential" in data) == (data["report_type"] == "lymphoma")
    assert validate_report(data).to_json_dict() == data
    tum = [e for e in data["fields"].values() if e.get("source") == "image"]
    assert tum and all(e["evidence"] and e["evidence"][0]["slide"] == "tumour-A1" for e in tum)


def test_markdown_shows_every_field_reason_source_and_banner(report):
    md = render_report(report, "md")
    rtype = get_report_type(report.report_type)
    assert md.startswith(f"> **{BANNER}**") and md.rstrip().endswith(f"_{BANNER}_")
    rows = [line for line in md.splitlines() if line.startswith("| ") and " | " in line]
    for spec in rtype.fields:
        row = next(r for r in rows if r.startswith(f"| {spec.label}"))
        entry = getattr(report.fields, spec.name)
        if entry.value is None:
            assert entry.reason.value.replace("_", " ") in row
        else:
            assert f"| {entry.source.value} |" in row
            if entry.source.value == "image":
                assert "tumour-A1 @" in row and "heatmaps/tumour-A1.png" in row


def test_fhir_renderer_is_structurally_valid(report):
    res = json.loads(render_report(report, "fhir"))
    assert validate_fhir(res) == []
    assert res["resourceType"] == "DiagnosticReport" and res["status"] == "preliminary"
    assert res["code"]["coding"][0] == {"system": "http://loinc.org", "code": "60568-3",
                                        "display": "Pathology Synoptic report"}
    rtype = get_report_type(report.report_type)
    n_ddx = len(getattr(report, "morphologic_differential", []))
    assert len(res["result"]) == len(res["contained"]) == len(rtype.fields) + n_ddx
    obs = {o["code"]["coding"][0]["code"]: o for o in res["contained"]
           if o["id"].startswith("f-")}
    for spec in rtype.fields:
        entry = getattr(report.fields, spec.name)
        o = obs[spec.name]
        if entry.value is None:
            coding = o["dataAbsentReason"]["coding"][0]
            assert coding == {"system": DAR, "code": REASON_TO_DAR[entry.reason.value]}
        elif spec.kind == "number":
            assert o["valueQuantity"]["value"] == entry.value
        elif spec.kind == "integer":
            assert o["valueInteger"] == entry.value
    assert res["conclusion"].startswith(BANNER)


def _fhir():
    return to_fhir(draft_report(findings(), "colorectal_resection", now=NOW))


@pytest.mark.parametrize("breakage, problem", [
    (lambda r: r.update(resourceType="Observation"), "resourceType"),
    (lambda r: r.update(status="draft"), "status 'draft'"),
    (lambda r: r["code"]["coding"][0].pop("system"), "absolute system URI"),
    (lambda r: r["code"].update(coding=[]), "empty element"),
    (lambda r: r["result"].append({"reference": "#nowhere"}), "does not resolve"),
    (lambda r: r["contained"][1].update(id=r["contained"][0]["id"]), "duplicate id"),
    (lambda r: r["contained"][0].update(valueString="x"), "exactly one of value[x]"),
    (lambda r: r["contained"][0].pop("dataAbsentReason"), "exactly one of value[x]"),
    (lambda r: r["contained"][0]["dataAbsentReason"]["coding"][0].update(code="guess"),
     "not in http://terminology.hl7.org"),
    (lambda r: r["contained"][0].update(valueFoo=1), "bad value[x]"),
    (lambda r: r["contained"][0].update(status="maybe"), "bad status"),
    (lambda r: r["contained"][0].update(note=[{"text": ""}]), "empty element"),
])
def test_fhir_validator_catches_each_rule(breakage, problem):
    res = _fhir()
    assert res["contained"][0]["code"]["coding"][0]["code"] == "procedure"  # abstains (GC)
    assert validate_fhir(res) == []
    broken = copy.deepcopy(res)
    breakage(broken)
    assert any(problem in e for e in validate_fhir(broken)), validate_fhir(broken)


def test_template_narrative_mentions_only_filled_fields():
    report = draft_report(ImageFindings(), "colorectal_resection",
                          clinical={"procedure": "Low anterior resection"})
    text = report.narrative
    assert text.startswith(BANNER)
    assert "Procedure: Low anterior resection (as entered)" in text
    rtype = get_report_type("colorectal_resection")
    for spec in rtype.fields:  # every other field abstains and is not named
        if spec.name != "procedure":
            assert f"{spec.label}:" not in text
    assert f"{len(rtype.fields) - 1} field(s) remain open" in text


def test_llm_narrative_gets_only_facts_and_keeps_the_banner():
    prompts = []

    def llm(prompt):
        prompts.append(prompt)
        return "Sheets of small lymphocytes."

    report = draft_report(findings(), "lymphoma", narrator=llm)
    assert report.narrative.startswith(BANNER) and "Sheets of small lymphocytes." in report.narrative
    assert "Predominant cell size: Small (from the image)" in prompts[0]
    assert "WHO-HAEM5" not in prompts[0] and "Lineage" not in prompts[0]  # abstaining fields
    fallback = draft_report(findings(), "lymphoma", narrator=lambda p: "   ")
    assert "Predominant cell size: Small (from the image)." in fallback.narrative
