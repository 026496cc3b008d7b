"""Report drafting for the app: image findings from the session's slides, clinical form -> draft."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from pathvlm.errors import ConfigError
from pathvlm.resources import resource_file

log = logging.getLogger(__name__)

REPORT_KINDS = ("colorectal_resection", "colorectal_biopsy", "lymphoma")
PRESETS = {"colorectal tissue": "crc_tissue", "lymphoma": "lymphoma"}  # label -> packaged prompt set


def preset_path(name: str) -> Path:
    return resource_file("prompts", PRESETS[name])


def clinical_from_form(kind: str, procedure: str | None, site: str | None, size_cm: float | None,
                       nodes_examined: float | None, nodes_positive: float | None) -> dict[str, Any]:
    """The clinical-context form as report fields of ``kind`` (empty entries left out)."""
    from pathvlm.reports import get_report_type

    rtype = get_report_type(kind)
    site_value: Any = site.strip() if site and site.strip() else None
    if site_value and rtype.spec("tumor_site").kind == "multi_enum":
        site_value = [s.strip() for s in site_value.split(",") if s.strip()]
    raw = {"procedure": procedure or None, "tumor_site": site_value,
           "tumor_size_cm": size_cm, "polyp_size_cm": size_cm,
           "lymph_nodes_examined_count": None if nodes_examined is None else int(nodes_examined),
           "lymph_nodes_positive_count": None if nodes_positive is None else int(nodes_positive)}
    return {k: v for k, v in raw.items() if v not in (None, "", []) and k in rtype.field_names}


def classifier(model: Any, preset: str, cache: dict[str, Any]) -> Any:
    """A zero-shot classifier for a preset, built once per app (prompt encoding is the slow part)."""
    from pathvlm.zeroshot import ZeroShotClassifier

    if preset not in cache:
        cache[preset] = ZeroShotClassifier(model, prompts=preset_path(preset), progress=False)
    return cache[preset]


def build_case(session: Any) -> Any:
    from pathvlm.case import AncillaryResult, Case, SlideRef

    slides = [SlideRef(path=Path(s.path), stain=s.stain) for s in session.slides]
    results = [AncillaryResult(**r) for r in session.ancillary]
    return Case(id=session.slides[0].name, slides=slides, ancillary_results=results)


def drafter_for(model: Any, cache: dict[str, Any]) -> Any:
    """One ``ReportDrafter`` per app, so prompt embeddings are computed once, not per click."""
    from pathvlm.reports.from_model import ReportDrafter

    if "drafter" not in cache:
        cache["drafter"] = ReportDrafter(model)
    return cache["drafter"]


def draft_for_session(model: Any, session: Any, cache: Any, kind: str, clinical: dict[str, Any],
                      shared: dict[str, Any], min_confidence: float | None = None) -> Any:
    """Draft a ``kind`` report over all slides of the session's case from their cached features.

    Same drafting as ``PathVLM.draft_report``; the case carries stains and ancillary results.
    """
    if not session.slides:
        raise ConfigError("open a slide or image first")
    from pathvlm.model.inputs import SlideInputs

    inputs = SlideInputs(left_out=session.left_out)  # the report's flags name the slides left out
    for s in session.slides:
        prepared = cache.get(s.key)
        if prepared is None:
            raise ConfigError(f"{s.path}: the slide dropped out of the cache; open it again")
        item = copy.copy(prepared.inputs[0])
        item.name, item.stain = s.name, s.stain
        inputs.append(item)
    return drafter_for(model, shared).draft(inputs, kind, clinical, build_case(session),
                                            min_confidence=min_confidence)


def evidence_choices(report: Any) -> list[str]:
    """What the pathologist can click to see its tiles: filled fields with evidence, the
    differential entities and the tissue-composition classes."""
    data = report.to_json_dict()
    out = [f"field: {name}" for name, e in data["fields"].items() if e.get("evidence")]
    out += [f"differential: {d['entity']}" for d in data.get("morphologic_differential") or []
            if d.get("evidence")]
    comp = data.get("tissue_composition") or {}
    out += [f"tissue: {c}" for c, ev in (comp.get("evidence") or {}).items() if ev]
    return out


def evidence_rows(report: Any, choice: str) -> list[dict[str, Any]]:
    """Tiles (slide, level-0 xy) cited for one `evidence_choices` item, for `viz.tile_crops`."""
    data = report.to_json_dict()
    what, _, name = (choice or "").partition(": ")
    if what == "field":
        evidence = data["fields"].get(name, {}).get("evidence") or []
    elif what == "differential":
        evidence = next((d["evidence"] for d in data.get("morphologic_differential") or []
                         if d["entity"] == name), [])
    elif what == "tissue":
        evidence = ((data.get("tissue_composition") or {}).get("evidence") or {}).get(name, [])
    else:
        return []
    return [{"slide": ev["slide"], "xy": tuple(xy), "weight": 1.0 / (rank + 1)}
            for ev in evidence for rank, xy in enumerate(ev["tiles"])]


def write_downloads(report: Any, out_dir: Path) -> dict[str, Path]:
    """The report as JSON, Markdown and FHIR files in ``out_dir``."""
    from pathvlm.reports import render_report

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt, suffix in (("json", "json"), ("md", "md"), ("fhir", "fhir.json")):
        p = out_dir / f"{report.report_type}.{suffix}"
        p.write_text(render_report(report, fmt), encoding="utf-8")
        paths[fmt] = p
    return paths
