"""Table-driven tests of the marker rules, conflict flags, and how reports use entered results."""

from __future__ import annotations

import pytest
from report_helpers import findings, first_option, tumour_slide

from pathvlm.case import AncillaryResult, Case, SlideRef
from pathvlm.reports import ImageFindings, Reason, SlideFindings, Source, draft_report
from pathvlm.reports.ancillary import assess_lymphoma, colorectal_fields, describe

MCL, CLL = "Mantle cell lymphoma", "Chronic lymphocytic leukaemia/small lymphocytic lymphoma"
FL, CHL = "Follicular lymphoma", "Classic Hodgkin lymphoma"


def res(*items: str) -> list[AncillaryResult]:
    """'CD5+' -> positive, 'CD23-' -> negative, 'PAX5 weak', 'cyclin D1 ?' -> equivocal."""
    out = []
    for item in items:
        for suffix, result in (("+", "positive"), ("-", "negative"), (" weak", "weak"),
                               (" ?", "equivocal"), (" loss", "loss"), (" intact", "intact")):
            if item.endswith(suffix):
                target = item[: -len(suffix)]
                test = "FISH" if target.startswith("t(") else "IHC"
                out.append(AncillaryResult(test=test, target=target, result=result))
                break
        else:
            raise ValueError(item)
    return out


# results, supported entities, established entity, flagged?
LYMPHOMA_RULES = [
    (("cyclin D1+",), {MCL}, MCL, False),
    (("SOX11+",), {MCL}, None, False),
    (("t(11;14)+",), {MCL}, MCL, False),
    (("CD5+", "CD23+"), {CLL}, None, False),  # establishing CLL also needs cyclin D1 negative
    (("CD5+", "CD23+", "cyclin D1-"), {CLL}, CLL, False),
    (("CD10+", "BCL2+"), {FL}, FL, False),
    (("BCL6+", "BCL2+"), {FL}, FL, False),
    (("CD10+", "BCL2-"), set(), None, False),
    (("t(14;18)+",), {FL}, None, False),
    (("CD30+", "CD15+", "PAX5 weak"), {CHL}, CHL, False),
    (("CD30+", "CD15+", "PAX5+"), set(), None, False),  # strong PAX5 is not the cHL pattern
    (("CD30+", "CD15+", "PAX5 weak", "CD45+"), {CHL}, None, True),
    (("cyclin D1+", "CD5+", "CD23+", "CD10+", "BCL2+"), {MCL, CLL, FL}, None, True),
    (("cyclin D1+", "CD5+", "CD23+"), {MCL, CLL}, None, True),
    (("SOX11+", "cyclin D1-"), {MCL}, None, True),
    (("cyclin D1 ?", "CD5+"), set(), None, True),
    (("CD5+",), set(), None, False),
    ((), set(), None, False),
]


@pytest.mark.parametrize("items, supported, established, flagged", LYMPHOMA_RULES)
def test_lymphoma_rule_table(items, supported, established, flagged):
    out = assess_lymphoma(res(*items))
    assert set(out.supported) == supported
    assert out.established == established
    assert bool(out.flags) == flagged
    if established:
        entered = {describe(r) for r in res(*items)}
        assert out.established_by and set(out.established_by) <= entered
    if out.flags and len(supported) > 1:
        assert "not resolved" in out.flags[0] and all(e in out.flags[0] for e in supported)


def _lymphoma_case(items, slides=None) -> Case:
    return Case(id="c1", slides=slides or [SlideRef(path="he.png", stain="H&E")],
                ancillary_results=res(*items))


def _draft(items, chooser=first_option):
    f = ImageFindings([SlideFindings("he", entity_probs={"CLL": 0.6, "MCL": 0.25, "FL": 0.15})],
                      choose=chooser)
    return draft_report(f, "lymphoma", case=_lymphoma_case(items))


def test_established_entity_names_the_results():
    report = _draft(("cyclin D1+", "CD5+", "CD23-"))
    who = report.fields.who_haem5_diagnosis
    assert who.value == MCL and who.source == Source.ancillary_result
    assert "cyclin D1 positive (IHC)" in who.note
    assert report.fields.lineage.value == "B-cell"
    assert report.fields.immunophenotyping.value == "Performed"
    ddx = report.morphologic_differential
    assert ddx[0].entity == MCL  # cyclin D1 outweighs the image's CLL lead
    assert ddx[0].supported_by == ["cyclin D1 positive (IHC)"]
    assert next(d for d in ddx if d.entity == CLL).contradicted_by == ["CD23 negative (IHC)"]
    assert abs(sum(d.probability for d in ddx) - 1.0) < 1e-3


def test_conflicts_are_flagged_not_resolved():
    report = _draft(("cyclin D1+", "CD5+", "CD23+", "CD10+", "BCL2+"))
    assert report.fields.who_haem5_diagnosis.value is None
    assert report.fields.who_haem5_diagnosis.reason == Reason.requires_ancillary_testing
    assert report.fields.lineage.value is None
    assert any("not resolved" in f for f in report.flags)
    assert "not resolved" in report.narrative


def test_morphology_alone_never_establishes_an_entity():
    report = _draft(())
    assert report.fields.who_haem5_diagnosis.value is None
    assert report.morphologic_differential[0].entity == CLL
    assert report.morphologic_differential[0].confirm_with[:3] == ["CD5", "CD23", "LEF1"]


@pytest.mark.parametrize("items, graded", [(("CD10+", "BCL2+"), True), (("cyclin D1+",), False),
                                           ((), False)])
def test_fl_grade_only_once_fl_is_established(items, graded):
    report = _draft(items)
    assert (report.fields.fl_grade.value is not None) == graded
    assert report.fields.chl_subtype.value is None


def test_lymphoma_study_fields_from_results():
    results = [AncillaryResult(test="FISH", target="MYC rearrangement", result="negative"),
               AncillaryResult(test="IHC", target="Ki-67", result="value", value="85%"),
               AncillaryResult(test="ISH", target="EBER", result="positive"),
               AncillaryResult(test="flow", target="CD19", result="positive")]
    case = Case(id="c", slides=[SlideRef(path="he.png")], ancillary_results=results)
    report = draft_report(ImageFindings(), "lymphoma", case=case)
    f = report.fields
    assert (f.myc_rearrangement.value, f.ki67_percent.value, f.ebv_eber_ish.value) == (
        "Not rearranged", 85.0, "Positive")
    assert f.flow_cytometry.value == "Performed" and f.cytogenetics_fish.value == "Performed"
    assert f.bcl2_rearrangement.reason == Reason.requires_ancillary_testing


# colorectal: results -> expected biomarker fields (None = stays requires_ancillary_testing)
CRC_RULES = [
    (("MLH1 loss", "PMS2 loss", "MSH2 intact", "MSH6 intact"),
     {"mmr_status": "MMR-deficient", "mlh1_ihc": "Loss of nuclear expression"}),
    (("MSH6-",), {"mmr_status": "MMR-deficient", "msh6_ihc": "Loss of nuclear expression"}),
    (("MLH1 intact", "PMS2 intact", "MSH2 intact", "MSH6 intact"),
     {"mmr_status": "MMR-proficient"}),
    (("MLH1 intact", "PMS2 intact"), {"mmr_status": None, "pms2_ihc": "Intact nuclear expression"}),
    (("BRAF V600E+",), {"braf_v600e": "Mutation detected (V600E)", "kras_status": None}),
    (("KRAS+", "NRAS-"), {"kras_status": "Mutation detected", "nras_status": "No mutation detected"}),
    (("MLH1 promoter methylation+",), {"mlh1_promoter_methylation": "Methylated"}),
    (("PTEN loss",), {"pten_ihc": "Loss"}),
]


@pytest.mark.parametrize("items, expected", CRC_RULES)
def test_colorectal_biomarker_table(items, expected):
    case = Case(id="c", slides=[SlideRef(path="t.svs")], ancillary_results=res(*items))
    for kind in ("colorectal_resection", "colorectal_biopsy"):
        report = draft_report(findings(), kind, case=case)
        for name, value in expected.items():
            entry = getattr(report.fields, name)
            assert entry.value == value
            if value is None:
                assert entry.reason == Reason.requires_ancillary_testing
            else:
                assert entry.source == Source.ancillary_result and "from:" in entry.note


def test_value_results_and_disagreement_flag():
    results = [AncillaryResult(test="PCR", target="MSI", result="value", value="mss"),
               AncillaryResult(test="IHC", target="HER2", result="value", value="3+"),
               AncillaryResult(test="FISH", target="HER2", result="positive"),
               AncillaryResult(test="IHC", target="MLH1", result="loss")]
    filled, flags = colorectal_fields(results)
    assert filled["msi_status"].value == "MSS"
    assert filled["her2_ish"].value == "Amplified"  # the FISH entry wins over IHC for HER2
    assert any("disagree" in f for f in flags)
    filled, flags = colorectal_fields([AncillaryResult(test="PCR", target="MSI", result="value",
                                                       value="very high")])
    assert "msi_status" not in filled and "does not map" in flags[0]


def test_node_fields_use_only_lymph_node_slides():
    node = SlideFindings("node-B1", role="lymph_node", tissue_fractions={"TUM": 0.2, "LYM": 0.8},
                         class_tiles={"TUM": [(10, 20)]})
    report = draft_report(ImageFindings([tumour_slide(tum=0.6), node], choose=first_option),
                          "colorectal_resection")
    entry = report.fields.regional_lymph_node_status
    assert entry.value == "Tumor present in regional lymph node(s)"
    assert [e.slide for e in entry.evidence] == ["node-B1"] and entry.evidence[0].tiles == [(10, 20)]
    assert report.fields.lymph_nodes_positive_count.value is None  # counts are the pathologist's
    # the tumour slide's carcinoma never counts as nodal disease
    report = draft_report(ImageFindings([tumour_slide(tum=0.6)], choose=first_option),
                          "colorectal_resection")
    entry = report.fields.regional_lymph_node_status
    assert entry.value is None
    assert entry.reason == Reason.cannot_be_determined_from_submitted_tissue
    assert "lymph_node" in entry.note
    assert any("no slide labelled as lymph node" in f for f in report.flags)


def test_case_roles_override_findings_and_ihc_slides_are_not_read():
    case = Case(id="c", slides=[SlideRef(path="a/tumour-A1.svs", role="lymph_node"),
                                SlideRef(path="b/ki.png", stain="IHC:Ki-67")])
    ihc = SlideFindings("ki", tissue_fractions={"TUM": 0.9})
    report = draft_report(ImageFindings([tumour_slide(), ihc], choose=first_option),
                          "colorectal_resection", case=case)
    assert report.fields.regional_lymph_node_status.evidence[0].slide == "tumour-A1"
    assert report.fields.histologic_type.value is None  # no tumour H&E slide remains
    assert report.case_id == "c" and report.slides[1]["stain"] == "IHC:Ki-67"
