"""Assemble a draft report from image findings, clinical input and entered ancillary results.

Enforcement, not trust: each field is filled only from the sources its assessability admits
(ancillary fields from entered results, gross/clinical fields from `clinical`, derived fields
computed), whatever the model proposes; model output outside a field's values is re-asked once
and otherwise recorded as undetermined.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from typing import TYPE_CHECKING, Any

from pathvlm.errors import ConfigError
from pathvlm.provenance import provenance
from pathvlm.reports import ancillary, derive
from pathvlm.reports.fields import Assess, FieldSpec, Reason, Source
from pathvlm.reports.findings import CRC_LABELS, ImageFindings, Proposal, SlideFindings
from pathvlm.reports.narrative import narrate
from pathvlm.reports.schemas import ReportBase, ReportType, get_report_type, report_model
from pathvlm.reports.tables import ENTITY_ALIASES, ENTITY_GATED, ENTITY_PANELS

if TYPE_CHECKING:
    from pathvlm.case import Case

log = logging.getLogger(__name__)

# fields whose image evidence must come from slides with this role (resections)
CONTEXT_ROLE = {
    "regional_lymph_node_status": "lymph_node",
    "margin_status_invasive": "margin",
    "margins_involved_invasive": "margin",
    "distance_to_radial_margin": "margin",
    "margin_status_noninvasive": "margin",
}
# counts the image cannot give: nodes and deposits are counted across all blocks by a person
NOT_FROM_IMAGE = frozenset({"lymph_nodes_positive_count", "tumor_deposits_count"})
TUMOR_MIN_FRACTION = 0.05  # below this share of tiles a slide shows no meaningful carcinoma


@dataclass
class _Ctx:
    rtype: ReportType
    findings: ImageFindings
    clinical: Mapping[str, Any]
    results: Sequence[Any]
    slides: list[SlideFindings]
    filled_anc: dict[str, ancillary.Filled] = field(default_factory=dict)
    established: str | None = None
    flags: list[str] = field(default_factory=list)
    threshold: float | None = 0.0  # min_confidence in force (None: nothing from the image)


def _entry(value: Any = None, reason: Reason | None = None, source: Source | None = None,
           confidence: float | None = None, evidence: list[dict] | None = None,
           note: str | None = None, considered: list[tuple[Any, float]] | None = None
           ) -> dict[str, Any]:
    shown = ([{"value": v, "probability": round(min(1.0, max(0.0, float(p))), 4)}
              for v, p in considered] if considered else None)
    if value is None:
        return {"reason": reason, "note": note, "considered": shown}
    return {"value": value, "source": source, "confidence": confidence,
            "evidence": evidence or [], "note": note, "considered": shown}


def _decide(spec: FieldSpec, prop: Proposal, ctx: _Ctx) -> dict[str, Any]:
    """Fill from a proposal only when its value is valid and its calibrated probability clears
    the threshold in force; otherwise abstain and list what was considered."""
    try:
        value = spec.coerce(prop.value)
        if spec.image_values and value not in spec.image_values:
            raise ValueError(f"{spec.name}: {value!r} needs ancillary confirmation")
    except (ValueError, TypeError) as exc:
        return _entry(reason=Reason.cannot_be_determined_from_submitted_tissue,
                      note=f"invalid model output: {str(exc)[:200]}", considered=prop.considered)
    why = None
    if not prop.calibrated:
        why = "model score not calibrated on labelled data: not filled from the image"
    elif ctx.threshold is None:
        why = "model uncalibrated: no value is filled from the image"
    elif prop.confidence is not None and prop.confidence < ctx.threshold:
        why = (f"best value {_short(value)} at probability {prop.confidence:.2f}, below the "
               f"threshold {ctx.threshold:.2f}")
    if why:
        note = f"{why}; {prop.note}" if prop.note else why
        return _entry(reason=Reason.cannot_be_determined_from_submitted_tissue, note=note,
                      considered=prop.considered or ([(value, prop.confidence)]
                                                     if prop.confidence is not None else None))
    conf = None if prop.confidence is None else round(float(prop.confidence), 4)
    return _entry(value, source=Source.image, confidence=conf, evidence=prop.evidence,
                  note=prop.note, considered=prop.considered or None)


def _short(value: Any) -> str:
    return "; ".join(map(str, value)) if isinstance(value, list) else str(value)


def _he_slides(ctx: _Ctx, role: str | None) -> list[SlideFindings]:
    """H&E slides for a field: those with `role`, or for tumour fields all but node/margin."""
    he = [s for s in ctx.slides if s.is_he]
    if role is not None:
        return [s for s in he if s.role == role]
    return [s for s in he if s.role not in ("lymph_node", "margin")]


def _evidence(slides: Sequence[SlideFindings], key: str | None = None) -> list[dict]:
    out = []
    for s in slides:
        tiles = s.class_tiles.get(key, []) if key else []
        out.append({"slide": s.slide, "tiles": [tuple(map(int, t)) for t in
                                                (tiles or s.top_tiles)][:8],
                    "heatmap": s.heatmap})
    return out


def _mean_fractions(slides: Sequence[SlideFindings]) -> dict[str, float]:
    keys = {k for s in slides for k in s.tissue_fractions}
    return {k: sum(s.tissue_fractions.get(k, 0.0) for s in slides) / len(slides) for k in keys}


def _head_p(slides: Sequence[SlideFindings], head: str, cls: str = "present"
            ) -> tuple[float, SlideFindings] | None:
    """The highest calibrated probability of `cls` over the slides that carry `head`."""
    rows = [(s.heads[head][cls], s) for s in slides if cls in s.heads.get(head, {})]
    return max(rows, key=lambda r: r[0]) if rows else None


def _head_evidence(slides: Sequence[SlideFindings], head: str, cls: str) -> list[dict]:
    return [{"slide": s.slide, "tiles": [tuple(map(int, t)) for t in
                                         s.head_tiles.get(head, {}).get(cls, [])][:8],
             "heatmap": s.heatmap} for s in slides if head in s.heads]


def _calibrated(spec: FieldSpec, slides: list[SlideFindings], kind: str,
                threshold: float | None) -> Proposal | dict | None:
    """Proposals from calibrated heads (`pathvlm.scoring`) for the fields they decide."""
    if kind == "lymphoma":
        return None
    if spec.name == "regional_lymph_node_status":
        hit = _head_p(slides, "node_tumor")
        if hit is None:
            return None
        p, node = hit
        value = "Tumor present in regional lymph node(s)"
        return Proposal(value, p, [(value, p)], _head_evidence([node], "node_tumor", "present"),
                        note="absence on the submitted node slides would not prove all nodes "
                        "negative: only tumour presence is reported")
    if spec.name not in ("histologic_type", "tumor_cell_percent"):
        return None
    hit = _head_p(slides, "crc_tumor")
    if hit is None:
        return None
    p, _ = hit
    frac = _mean_fractions(slides)
    tum, muc = frac.get("TUM", 0.0), frac.get("MUC", 0.0)
    if spec.name == "histologic_type":
        # WHO 2019: mucinous means >50% extracellular mucin of the tumour
        mucinous = muc / (tum + muc) if tum + muc > 0 else 0.0
        value = "Mucinous adenocarcinoma" if mucinous > 0.5 else "Adenocarcinoma"
        return Proposal(value, p, [(value, p)], _head_evidence(slides, "crc_tissue",
                                                               "MUC" if mucinous > 0.5 else "TUM"),
                        note=f"probability is that carcinoma is present; mucin {mucinous:.0%} of "
                        "tumour tiles decides the type (not calibrated)")
    tissue = sum(v for k, v in frac.items() if k not in ("BACK", "ADI"))
    if tissue <= 0 or threshold is None or p < threshold:
        return _entry(reason=Reason.cannot_be_determined_from_submitted_tissue,
                      note=f"carcinoma not established (present at probability {p:.2f}"
                      + (f", threshold {threshold:.2f})" if threshold is not None else ")"))
    pct = round(100.0 * tum / tissue, 1)
    return Proposal(pct, p, [], _head_evidence(slides, "crc_tissue", "TUM"),
                    note=f"share of carcinoma tiles among tissue tiles (estimate); carcinoma "
                    f"present at probability {p:.2f}")


def _heuristic(spec: FieldSpec, slides: list[SlideFindings], kind: str) -> dict | None:
    """Values that follow directly from tile-class composition of hand-built findings."""
    if not slides or kind == "lymphoma":
        return None
    frac = _mean_fractions(slides)
    tum, muc = frac.get("TUM", 0.0), frac.get("MUC", 0.0)
    if spec.name == "regional_lymph_node_status":
        worst = max(slides, key=lambda s: s.tissue_fractions.get("TUM", 0.0))
        share = worst.tissue_fractions.get("TUM", 0.0)
        if share >= TUMOR_MIN_FRACTION:
            return _entry("Tumor present in regional lymph node(s)", source=Source.image,
                          confidence=min(1.0, 0.5 + share), evidence=_evidence([worst], "TUM"),
                          note=f"carcinoma tiles {share:.0%} of node slide {worst.slide}")
        return None  # absence on the given node slides does not prove all nodes negative
    if spec.name == "histologic_type" and tum + muc >= TUMOR_MIN_FRACTION:
        # WHO 2019: mucinous means >50% extracellular mucin of the tumour
        mucinous = muc / (tum + muc)
        value = "Mucinous adenocarcinoma" if mucinous > 0.5 else "Adenocarcinoma"
        return _entry(value, source=Source.image, confidence=round(max(mucinous, 1 - mucinous), 3),
                      evidence=_evidence(slides, "MUC" if mucinous > 0.5 else "TUM"),
                      note=f"mucin {mucinous:.0%} of tumour tiles")
    if spec.name == "tumor_cell_percent" and tum >= TUMOR_MIN_FRACTION:
        tissue = sum(v for k, v in frac.items() if k not in ("BACK", "ADI"))
        pct = round(100.0 * tum / tissue, 1) if tissue > 0 else None
        if pct is not None:
            return _entry(pct, source=Source.image, confidence=None,
                          evidence=_evidence(slides, "TUM"),
                          note="share of carcinoma tiles among tissue tiles (estimate)")
    return None


def _ask(spec: FieldSpec, ctx: _Ctx, slides: list[SlideFindings]) -> dict[str, Any]:
    """A model answer validated against the field; one re-ask, then abstain with a note."""
    options = list(spec.image_values or spec.values)
    question = (f"{spec.label} on slide(s) {', '.join(s.slide for s in slides)}"
                + (f"; choose from: {'; '.join(options)}" if options else f" ({spec.kind})"))
    answers: list[Any] = []
    if spec.name in ctx.findings.proposals:
        answers.append(ctx.findings.proposals[spec.name])
    chooser = ctx.findings.choose
    problems: list[str] = []
    for attempt in range(2):
        if len(answers) <= attempt:
            if chooser is None:
                break
            answers.append(chooser(spec, question, options))
        if isinstance(answers[attempt], Proposal):
            return _decide(spec, answers[attempt], ctx)
        raw, conf = answers[attempt], None
        if (isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[1], float)
                and 0.0 <= raw[1] <= 1.0):
            raw, conf = raw
        try:
            value = spec.coerce(raw)
            if spec.image_values and value not in spec.image_values:
                raise ValueError(f"{spec.name}: {value!r} needs ancillary confirmation")
        except (ValueError, TypeError) as exc:
            problems.append(str(exc)[:200])
            continue
        return _decide(spec, Proposal(value, conf, evidence=_evidence(slides)), ctx)
    note = ("invalid model output: " + " | ".join(problems)) if problems else "no model answer"
    if problems:
        log.info("field %s left undetermined after %d invalid answer(s)", spec.name, len(problems))
    return _entry(reason=Reason.cannot_be_determined_from_submitted_tissue, note=note)


def _image_field(spec: FieldSpec, ctx: _Ctx) -> dict[str, Any]:
    gate = ENTITY_GATED.get(spec.name)
    if gate is not None and ctx.established != gate:
        return _entry(reason=Reason.requires_ancillary_testing,
                      note=f"graded only once {gate} is established by ancillary results")
    if spec.name in NOT_FROM_IMAGE:
        return _entry(reason=Reason.requires_gross_or_clinical_information,
                      note="counted across all blocks by the pathologist")
    role = CONTEXT_ROLE.get(spec.name) if ctx.rtype.name == "colorectal_resection" else None
    slides = _he_slides(ctx, role)
    if not slides:
        where = f"H&E slide labelled '{role}'" if role else "H&E slide"
        return _entry(reason=Reason.cannot_be_determined_from_submitted_tissue,
                      note=f"no {where} in the submitted material")
    if any(s.heads for s in slides):  # scores from a model: calibrated heads, else the LLM
        prop = _calibrated(spec, slides, ctx.rtype.name, ctx.threshold)
        if isinstance(prop, dict):
            return prop
        if prop is not None:
            return _decide(spec, prop, ctx)
        if ctx.findings.choose is None and spec.name not in ctx.findings.proposals:
            return _entry(reason=Reason.cannot_be_determined_from_submitted_tissue,
                          note="no calibrated model score decides this field from the image")
        return _ask(spec, ctx, slides)
    return _heuristic(spec, slides, ctx.rtype.name) or _ask(spec, ctx, slides)


def _fill(spec: FieldSpec, ctx: _Ctx) -> dict[str, Any]:
    if spec.name in ctx.clinical and spec.assess not in (Assess.ANC, Assess.DER):
        try:
            value = spec.coerce(ctx.clinical[spec.name])
        except ValueError as exc:
            raise ConfigError(f"clinical input: {exc}") from None
        return _entry(value, source=Source.clinical, note="entered by the pathologist")
    if spec.assess == Assess.ANC:
        hit = ctx.filled_anc.get(spec.name)
        if hit is None:
            return _entry(reason=Reason.requires_ancillary_testing)
        return _entry(hit.value, source=Source.ancillary_result, note="from: " + "; ".join(
            hit.results))
    if spec.assess == Assess.GC:
        return _entry(reason=Reason.requires_gross_or_clinical_information)
    if spec.assess == Assess.DER:
        return _entry(reason=Reason.cannot_be_determined_from_submitted_tissue)  # set later
    return _image_field(spec, ctx)


def _derive(fields: dict[str, dict]) -> None:
    extent = fields["tumor_extent"]
    if extent.get("source") == Source.clinical:
        d = derive.derive_pt(extent["value"])
    elif "value" in extent:
        d = derive.derive_pt(extent["value"])
        d = derive.Derived(None, Reason.requires_gross_or_clinical_information,
                           f"extent from the image only ({extent['value']}"
                           f"{' -> ' + d.value if d.value else ''}); confirm it to assign pT")
    else:
        d = derive.derive_pt(None)
    fields["pT"] = _entry(d.value, d.reason, Source.derived, note=d.note)

    def count(name: str) -> int | None:
        entry = fields[name]
        return entry.get("value") if entry.get("source") == Source.clinical else None

    d = derive.derive_pn(count("lymph_nodes_positive_count"),
                         count("lymph_nodes_examined_count"), fields["tumor_deposits"].get("value"))
    fields["pN"] = _entry(d.value, d.reason, Source.derived, note=d.note)


def _differential(ctx: _Ctx, assessment: ancillary.LymphomaAssessment) -> list[dict]:
    slides = _he_slides(ctx, None)
    probs: dict[str, float] = {}
    for s in slides:
        for name, p in s.entity_probs.items():
            entity = ENTITY_ALIASES.get(name, name)
            if entity not in ENTITY_PANELS:
                ctx.flags.append(f"image model gave unknown entity {name!r}; ignored")
                continue
            probs[entity] = probs.get(entity, 0.0) + max(0.0, float(p)) / len(slides)
    # entered results re-weight the morphologic impression; they never remove a candidate
    for entity in probs:
        if entity in assessment.supported:
            probs[entity] *= 4.0
        if entity in assessment.contradicted:
            probs[entity] *= 0.25
    total = sum(probs.values())
    ranked = sorted(probs.items(), key=lambda kv: -kv[1])
    used: set[tuple[int, int]] = set()
    out = []
    for e, p in ranked:
        out.append({"entity": e, "probability": round(p / total, 4) if total > 0 else 0.0,
                    "confirm_with": list(ENTITY_PANELS[e]),
                    "supported_by": assessment.supported.get(e, []),
                    "contradicted_by": assessment.contradicted.get(e, []),
                    "evidence": _entity_evidence(slides, e, used)})
    return out


def _entity_evidence(slides: Sequence[SlideFindings], entity: str,
                     used: set[tuple[int, int]], n: int = 4) -> list[dict]:
    """Tiles that most support `entity`, skipping tiles a higher-ranked entity already cites."""
    out = []
    for s in slides:
        tiles = next((t for name, t in s.head_tiles.get("lymphoma_entity", {}).items()
                      if ENTITY_ALIASES.get(name, name) == entity), [])
        mine = [tuple(map(int, t)) for t in tiles if tuple(map(int, t)) not in used][:n]
        used.update(mine)
        if mine:
            out.append({"slide": s.slide, "tiles": mine, "heatmap": s.heatmap})
    return out


def _composition(slides: Sequence[SlideFindings], threshold: float | None) -> dict | None:
    """Colorectal tissue composition: the share of tiles whose calibrated top class clears the
    threshold, per class (the rest undetermined), and the predominant class of the slides."""
    tops = [t for s in slides for t in s.tile_top]
    rows = [s.heads["crc_tissue"] for s in slides if "crc_tissue" in s.heads]
    if not tops or not rows:
        return None
    counts: dict[str, int] = {}
    for cls, p in tops:
        if threshold is not None and p >= threshold:
            counts[cls] = counts.get(cls, 0) + 1
    n = len(tops)
    classes = list(rows[0])
    mean = {c: sum(r.get(c, 0.0) for r in rows) / len(rows) for c in classes}
    best = max(mean, key=mean.get)
    return {"n_tiles": n, "min_confidence": threshold,
            "fractions": {c: round(k / n, 4) for c, k in sorted(counts.items())},
            "undetermined": round(1.0 - sum(counts.values()) / n, 4),
            "predominant": {"class": best, "label": CRC_LABELS.get(best, best),
                            "probability": round(mean[best], 4),
                            "determined": threshold is not None and mean[best] >= threshold},
            "evidence": {c: _head_evidence(slides, "crc_tissue", c) for c in sorted(counts)}}


def draft_report(findings: ImageFindings, kind: str, clinical: Mapping[str, Any] | None = None,
                 case: Case | None = None, narrator: Callable[[str], str] | None = None,
                 now: datetime | None = None, min_confidence: float | None = None) -> ReportBase:
    """Draft a report of type `kind`; the result always validates against its schema.

    Args:
        findings: image-derived evidence (may be empty: every image field then abstains).
        kind: a name from `list_report_types()`.
        clinical: pathologist-entered values by field name (defaults to the case's).
        case: the case, for its slides' stains/roles and entered ancillary results.
        narrator: optional LLM call prompt -> text for the narrative (used only when its
            text passes `narrative.check_prose`).
        now: timestamp (tests pin it).
        min_confidence: threshold in force for image-decided values (None: the findings',
            i.e. the one chosen on val by the model's calibration).
    """
    rtype = get_report_type(kind)
    clinical = dict(case.clinical if (clinical is None and case is not None) else clinical or {})
    unknown = sorted(set(clinical) - set(rtype.field_names))
    if unknown:
        raise ConfigError(f"clinical input: unknown field(s) {', '.join(unknown)} for report "
                          f"type {kind}")
    for name in clinical:
        if rtype.spec(name).assess in (Assess.ANC, Assess.DER):
            raise ConfigError(f"clinical input: {name} is {rtype.spec(name).assess.value}; enter "
                              "ancillary results as results, derived fields are computed")
    results = list(case.ancillary_results) if case is not None else []
    slides = [_with_case_labels(s, case) for s in findings.slides]
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ConfigError(f"min_confidence must be in [0, 1], got {min_confidence}")
    threshold = findings.min_confidence if min_confidence is None else float(min_confidence)
    ctx = _Ctx(rtype, findings, clinical, results, slides, threshold=threshold)
    assessment = ancillary.assess_lymphoma(results)
    if kind == "lymphoma":
        ctx.filled_anc, flags = ancillary.lymphoma_fields(results)
        ctx.flags += flags + assessment.flags
        if assessment.established:
            ctx.filled_anc["who_haem5_diagnosis"] = ancillary.Filled(
                assessment.established, assessment.established_by)
            if assessment.lineage:
                ctx.filled_anc["lineage"] = ancillary.Filled(assessment.lineage,
                                                             assessment.established_by)
            ctx.established = assessment.established
    else:
        ctx.filled_anc, flags = ancillary.colorectal_fields(results)
        ctx.flags += flags
    fields = {spec.name: _fill(spec, ctx) for spec in rtype.fields}
    if kind == "colorectal_resection":
        _derive(fields)
    if not _he_slides(ctx, "lymph_node") and kind == "colorectal_resection":
        ctx.flags.append("no slide labelled as lymph node: node fields use pathologist counts only")
    cal = dict(findings.calibration or {})
    if cal:
        cal["threshold_from"] = "user" if min_confidence is not None else "calibration"
        if cal.get("problem"):
            ctx.flags.append(cal["problem"])
    data: dict[str, Any] = {"report_type": kind, "fields": fields, "flags": ctx.flags,
                            "model": findings.model, "min_confidence": threshold,
                            "calibration": cal or None,
                            "provenance": provenance(weights_hash=findings.weights_hash),
                            "generated_at": (now or datetime.now(timezone.utc)).isoformat()}
    if rtype.has_differential:
        data["morphologic_differential"] = _differential(ctx, assessment)
    else:
        data["tissue_composition"] = _composition(_he_slides(ctx, None), threshold)
    if case is not None:
        data["case_id"] = case.id
        data["slides"] = [s.summary() for s in case.slides]
        data["ancillary_results"] = [r.model_dump(mode="json") for r in results]
    # the narrative reads the same entries the report holds, so it names only real values
    plain = {name: {k: v.value if isinstance(v, Enum) else v for k, v in entry.items()
                    if v is not None} for name, entry in fields.items()}
    data["narrative"], data["narrative_source"] = narrate(
        rtype, plain, data.get("morphologic_differential"), ctx.flags, llm=narrator,
        threshold=threshold, composition=data.get("tissue_composition"))
    return report_model(kind).model_validate(data)


def _with_case_labels(s: SlideFindings, case: Case | None) -> SlideFindings:
    """Stain and role from the case manifest win over what the model side guessed."""
    if case is None:
        return s
    for ref in case.slides:
        if ref.name == s.slide:
            return replace(s, stain=ref.stain, role=ref.role or s.role)
    return s
