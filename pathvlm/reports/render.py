"""Render a report as JSON, Markdown or FHIR R4; `render_report(report, fmt)` is what the CLI calls."""

from __future__ import annotations

import json
from collections.abc import Callable

from pathvlm.errors import ConfigError
from pathvlm.reports.fhir import to_fhir
from pathvlm.reports.fields import Assess
from pathvlm.reports.findings import CRC_LABELS
from pathvlm.reports.narrative import _show
from pathvlm.reports.schemas import BANNER, ReportBase, get_report_type


def render_json(report: ReportBase) -> str:
    return json.dumps(report.to_json_dict(), indent=2, ensure_ascii=False)


def render_fhir(report: ReportBase) -> str:
    return json.dumps(to_fhir(report), indent=2, ensure_ascii=False)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: ReportBase) -> str:
    """A readable form: banner, narrative, flags, differential and one row per field."""
    rtype = get_report_type(report.report_type)  # type: ignore[attr-defined]
    data = report.to_json_dict()
    lines = [f"> **{BANNER}**", "", f"# {rtype.title}", ""]
    if data.get("case_id"):
        lines += [f"Case: `{data['case_id']}`", ""]
    lines += [f"Model: `{data['model']}` - generated {data['generated_at']}", ""]
    if data.get("provenance"):
        lines += ["Provenance: " + ", ".join(f"{k} `{v}`" for k, v in data["provenance"].items()), ""]
    lines += [_threshold_line(data), ""]
    if data.get("slides"):
        lines += ["## Slides", ""] + [
            f"- {s['name']}: {s['stain']}" + (f", part {s['part']}" if s.get("part") else "")
            + (f", {s['role']}" if s.get("role") else "") for s in data["slides"]] + [""]
    if data["flags"]:
        lines += ["## Flags for the pathologist", ""] + [f"- {f}" for f in data["flags"]] + [""]
    narrative = data["narrative"].replace(BANNER, "").strip()
    lines += ["## Narrative", "", narrative, ""]
    ddx = data.get("morphologic_differential")
    if ddx is not None:
        lines += ["## Morphologic differential (impression only - requires ancillary testing)",
                  "", "| # | entity | probability | confirm with | entered results | tiles |",
                  "|---|---|---|---|---|---|"]
        for i, d in enumerate(ddx, 1):
            results = "; ".join([f"for: {x}" for x in d["supported_by"]]
                                + [f"against: {x}" for x in d["contradicted_by"]]) or "-"
            lines.append(f"| {i} | {d['entity']} | {d['probability']:.2f} | "
                         f"{', '.join(d['confirm_with'])} | {_md_cell(results)} | "
                         f"{_md_cell(_tiles(d.get('evidence', [])))} |")
        if not ddx:
            lines.append("| - | no image evidence | - | - | - | - |")
        lines.append("")
    comp = data.get("tissue_composition")
    if comp:
        pred = comp["predominant"]
        lines += ["## Tissue composition (colorectal tissue classes of the tiles)", "",
                  f"{comp['n_tiles']} tile(s); a tile counts for a class when its calibrated "
                  "probability clears the threshold. Predominant: "
                  + (f"**{pred['label']}** ({pred['probability']:.2f})" if pred["determined"]
                     else f"not determined (best {pred['label']} at {pred['probability']:.2f})"),
                  "", "| class | share of tiles | tiles |", "|---|---|---|"]
        for c, frac in sorted(comp["fractions"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {CRC_LABELS.get(c, c)} | {frac:.0%} | "
                         f"{_md_cell(_tiles(comp.get('evidence', {}).get(c, [])))} |")
        lines += [f"| undetermined | {comp['undetermined']:.0%} | - |", ""]
    lines += ["## Fields", "", "| field | value or reason | source | confidence | evidence |",
              "|---|---|---|---|---|"]
    for spec in rtype.fields:
        e = data["fields"][spec.name]
        if "value" in e:
            shown = f"**{_md_cell(_show(e['value'], spec.unit))}**"
        else:
            shown = f"_{e['reason'].replace('_', ' ')}_"
        if e.get("note"):
            shown += f" ({_md_cell(e['note'])})"
        if e.get("considered") and "value" not in e:
            shown += " - considered: " + _md_cell(", ".join(
                f"{_show(c['value'])} {c['probability']:.2f}" for c in e["considered"]))
        evidence = _tiles(e.get("evidence", []))
        conf = f"{e['confidence']:.2f}" if e.get("confidence") is not None else "-"
        tag = "" if spec.assess == Assess.HE else f" [{spec.assess.value}]"
        lines.append(f"| {spec.label}{tag} | {shown} | {e.get('source') or '-'} | {conf} | "
                     f"{_md_cell(evidence)} |")
    lines += ["", f"_{BANNER}_", ""]
    return "\n".join(lines)


def _tiles(evidence: list[dict]) -> str:
    return "; ".join(
        f"{ev['slide']} @ " + (", ".join(f"({x},{y})" for x, y in ev["tiles"][:3]) or "-")
        + (f" [heatmap {ev['heatmap']}]" if ev.get("heatmap") else "")
        for ev in evidence) or "-"


def _threshold_line(data: dict) -> str:
    t, cal = data.get("min_confidence"), data.get("calibration") or {}
    if t is None:
        return ("**Threshold in force: none** - the model is uncalibrated, so no field is "
                "filled from the image" + (f" ({cal['problem']})" if cal.get("problem") else "")
                + ".")
    origin = ("set by the user" if cal.get("threshold_from") == "user" else
              f"chosen on the val split for selective precision {cal['target_precision']:.2f}"
              if cal.get("target_precision") else "given with the image findings")
    return (f"**Threshold in force (min_confidence): {t:.2f}** ({origin}): an image-decided "
            "field holds a value only when its calibrated probability is at least this; "
            "otherwise it says it cannot be determined and lists what was considered.")


RENDERERS: dict[str, Callable[[ReportBase], str]] = {
    "json": render_json, "md": render_markdown, "fhir": render_fhir}


def list_formats() -> list[str]:
    return list(RENDERERS)


def render_report(report: ReportBase, fmt: str) -> str:
    """The report as text in format `fmt` (json, md or fhir)."""
    try:
        return RENDERERS[fmt](report)
    except KeyError:
        raise ConfigError(f"unknown report format {fmt!r}; choose one of "
                          f"{', '.join(RENDERERS)}") from None
