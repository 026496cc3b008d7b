"""FHIR R4: a preliminary DiagnosticReport with one contained Observation per field.

`validate_fhir` checks the structural rules this renderer relies on (no network, no profile
validation): required elements, code systems, value[x] xor dataAbsentReason (obs-6), local
references resolving to contained resources, and no empty elements (ele-1).
"""

from __future__ import annotations

import re
from typing import Any

from pathvlm.reports.schemas import ReportBase, get_report_type

LOINC = "http://loinc.org"
DAR = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
UCUM = "http://unitsofmeasure.org"
FIELD_SYSTEM = "urn:pathvlm:report-field"
PROVENANCE_URL = "urn:pathvlm:provenance"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
# LOINC 60568-3: Pathology Synoptic report
REPORT_CODE = {"system": LOINC, "code": "60568-3", "display": "Pathology Synoptic report"}

REASON_TO_DAR = {
    "requires_ancillary_testing": "not-performed",
    "requires_gross_or_clinical_information": "unknown",
    "cannot_be_determined_from_submitted_tissue": "unknown",
    "not_applicable": "not-applicable",
}
DAR_CODES = frozenset({"unknown", "asked-unknown", "temp-unknown", "not-asked", "asked-declined",
                       "masked", "not-applicable", "unsupported", "as-text", "error",
                       "not-a-number", "negative-infinity", "positive-infinity", "not-performed",
                       "not-permitted"})
REPORT_STATUS = frozenset({"registered", "partial", "preliminary", "final", "amended",
                           "corrected", "appended", "cancelled", "entered-in-error", "unknown"})
OBS_STATUS = frozenset({"registered", "preliminary", "final", "amended", "corrected",
                        "cancelled", "entered-in-error", "unknown"})
VALUE_KEYS = ("valueString", "valueCodeableConcept", "valueQuantity", "valueInteger",
              "valueBoolean")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_URI = re.compile(r"^(https?://\S+|urn:\S+)$")


def _obs_id(name: str) -> str:
    return "f-" + re.sub(r"[^A-Za-z0-9\-.]", "-", name)


def _value(spec_kind: str, unit: str, value: Any) -> dict[str, Any]:
    if spec_kind == "multi_enum":
        return {"valueString": "; ".join(value)}
    if spec_kind == "enum":
        return {"valueCodeableConcept": {"text": value}}
    if spec_kind == "integer":
        return {"valueInteger": int(value)}
    if spec_kind == "number":
        q: dict[str, Any] = {"value": value}
        if unit:
            q.update(unit=unit, system=UCUM, code=unit)
        return {"valueQuantity": q}
    return {"valueString": value}


def to_fhir(report: ReportBase) -> dict[str, Any]:
    """The report as a FHIR R4 DiagnosticReport (JSON-ready dict)."""
    rtype = get_report_type(report.report_type)  # type: ignore[attr-defined]
    data = report.to_json_dict()
    contained, refs = [], []
    for spec in rtype.fields:
        entry = data["fields"][spec.name]
        obs: dict[str, Any] = {
            "resourceType": "Observation", "id": _obs_id(spec.name), "status": "preliminary",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": "laboratory"}]}],
            "code": {"coding": [{"system": FIELD_SYSTEM, "code": spec.name,
                                 "display": spec.label}], "text": spec.label},
        }
        if "value" in entry:
            obs.update(_value(spec.kind, spec.unit, entry["value"]))
            obs["method"] = {"text": f"source: {entry['source']}"}
        else:
            obs["dataAbsentReason"] = {
                "coding": [{"system": DAR, "code": REASON_TO_DAR[entry["reason"]]}],
                "text": entry["reason"]}
        notes = [entry["note"]] if entry.get("note") else []
        for ev in entry.get("evidence", []):
            tiles = ", ".join(f"({x}, {y})" for x, y in ev["tiles"]) or "none listed"
            notes.append(f"evidence: slide {ev['slide']}, level-0 tiles {tiles}"
                         + (f", heatmap {ev['heatmap']}" if ev.get("heatmap") else ""))
        if entry.get("confidence") is not None:
            notes.append(f"confidence {entry['confidence']:.2f}")
        if notes:
            obs["note"] = [{"text": n} for n in notes]
        contained.append(obs)
        refs.append({"reference": f"#{obs['id']}"})
    for i, d in enumerate(data.get("morphologic_differential", [])):
        obs = {"resourceType": "Observation", "id": f"ddx-{i + 1}", "status": "preliminary",
               "code": {"coding": [{"system": FIELD_SYSTEM, "code": "morphologic_differential",
                                    "display": "Morphologic differential"}]},
               "valueString": f"{d['entity']} (p={d['probability']:.2f}; {d['status']}; "
                              f"confirm with {', '.join(d['confirm_with'])})"}
        contained.append(obs)
        refs.append({"reference": f"#{obs['id']}"})
    out: dict[str, Any] = {
        "resourceType": "DiagnosticReport", "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                  "code": "SP", "display": "Surgical Pathology"}]}],
        "code": {"coding": [dict(REPORT_CODE)], "text": rtype.title},
        "issued": data["generated_at"], "contained": contained, "result": refs,
        "conclusion": data["narrative"],
    }
    if data.get("case_id"):
        out["subject"] = {"display": f"case {data['case_id']}"}
    if data.get("provenance"):  # software version, weights hash and commit that drafted it
        out["extension"] = [{"url": PROVENANCE_URL, "extension": [
            {"url": key, "valueString": value} for key, value in data["provenance"].items()]}]
    return out


def _empty_paths(node: Any, path: str = "") -> list[str]:
    if node is None or node == "" or node == [] or node == {}:
        return [path or "<root>"]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _empty_paths(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _empty_paths(v, f"{path}[{i}]")]
    return []


def _check_codeable(cc: Any, where: str, need_coding: bool) -> list[str]:
    if not isinstance(cc, dict):
        return [f"{where}: not a CodeableConcept"]
    codings = cc.get("coding", [])
    if need_coding and not codings:
        return [f"{where}: needs a coding"]
    return [f"{where}.coding[{i}]: needs an absolute system URI and a code"
            for i, c in enumerate(codings)
            if not (isinstance(c.get("system"), str) and _URI.match(c["system"]) and c.get("code"))]


def validate_fhir(resource: dict[str, Any]) -> list[str]:
    """Structural problems of a DiagnosticReport with contained Observations ([] if none)."""
    errors = [f"empty element at {p}" for p in _empty_paths(resource)]
    if resource.get("resourceType") != "DiagnosticReport":
        return errors + ["resourceType must be DiagnosticReport"]
    if resource.get("status") not in REPORT_STATUS:
        errors.append(f"status {resource.get('status')!r} is not a DiagnosticReport status")
    errors += _check_codeable(resource.get("code"), "code", need_coding=True)
    contained = {}
    for i, res in enumerate(resource.get("contained", [])):
        rid = res.get("id")
        if not isinstance(rid, str) or not _ID.match(rid) or rid in contained:
            errors.append(f"contained[{i}]: missing, malformed or duplicate id {rid!r}")
        contained[rid] = res
        if res.get("resourceType") != "Observation":
            continue
        where = f"Observation/{rid}"
        if res.get("status") not in OBS_STATUS:
            errors.append(f"{where}: bad status {res.get('status')!r}")
        errors += _check_codeable(res.get("code"), f"{where}.code", need_coding=True)
        values = [k for k in res if k.startswith("value")]
        if any(k not in VALUE_KEYS for k in values) or len(values) > 1:
            errors.append(f"{where}: bad value[x] {values}")
        dar = res.get("dataAbsentReason")
        if bool(values) == bool(dar):  # obs-6 and a report field needs one of them
            errors.append(f"{where}: needs exactly one of value[x] and dataAbsentReason")
        if dar:
            errors += _check_codeable(dar, f"{where}.dataAbsentReason", need_coding=True)
            for c in dar.get("coding", []):
                if c.get("system") != DAR or c.get("code") not in DAR_CODES:
                    errors.append(f"{where}: dataAbsentReason {c} not in {DAR}")
        q = res.get("valueQuantity")
        if q is not None and not isinstance(q.get("value"), (int, float)):
            errors.append(f"{where}: valueQuantity.value must be a number")
        if "valueInteger" in res and not isinstance(res["valueInteger"], int):
            errors.append(f"{where}: valueInteger must be an integer")
    for i, ref in enumerate(resource.get("result", [])):
        target = ref.get("reference", "") if isinstance(ref, dict) else ""
        res = contained.get(target[1:]) if target.startswith("#") else None
        if res is None or res.get("resourceType") != "Observation":
            errors.append(f"result[{i}]: {target!r} does not resolve to a contained Observation")
    return errors
