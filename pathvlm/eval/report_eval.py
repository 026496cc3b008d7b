"""Evaluate drafted reports on labelled images: top differential entity, H&E fields, abstention.

`ancillary_wrongly_filled_share` counts ancillary-only fields that hold a value although no
ancillary result was entered (images only): it must be 0.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathvlm.eval.common import scale_summary
from pathvlm.eval.datasets import load_dataset
from pathvlm.eval.report import write_report
from pathvlm.reports.fields import Assess
from pathvlm.reports.schemas import get_report_type
from pathvlm.reports.tables import ENTITY_ALIASES

log = logging.getLogger(__name__)


@dataclass
class ReportEvalConfig:
    kind: str = "lymphoma"
    split: str | None = None
    limit: int | None = None
    mpp: float | None = None  # um/px of images without their own (CSV 'mpp' column wins)


def _truth_columns(source: str | Path, split: str | None, names: set[str]) -> list[dict]:
    """Per-row ground truth for H&E fields: CSV columns named like the fields (same row order
    as `load_csv`); none for folders."""
    source = Path(source)
    if not (source.is_file() and source.suffix.lower() == ".csv"):
        return []
    with source.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if split is None or r.get("split") == split]
    return [{k: v for k, v in r.items() if k in names and v not in (None, "")} for r in rows]


def run_report_eval(model: Any, data: str | Path, cfg: ReportEvalConfig,
                    json_out: str | Path | None = None, model_name: str = "") -> dict[str, Any]:
    """Draft one report per image and score it against the image's label.

    Args:
        model: a PathVLM.
        data: class-per-folder directory or CSV (`path,label[,split][,<field>...]`).
        cfg: report type, split, optional limit.
        json_out: write JSON + Markdown here.
    """
    from pathvlm.reports.from_model import FindingsConfig, ReportDrafter
    from pathvlm.zeroshot import tile_scale

    rtype = get_report_type(cfg.kind)
    ds = load_dataset(data, cfg.split)
    he_fields = {s.name for s in rtype.fields if s.assess in (Assess.HE, Assess.HE_CTX)}
    anc_fields = [s.name for s in rtype.fields if s.assess == Assess.ANC]
    truths = _truth_columns(data, cfg.split, he_fields)
    n = len(ds) if cfg.limit is None else min(cfg.limit, len(ds))
    drafter = ReportDrafter(model, FindingsConfig(narrative_tokens=0))
    mpps = ds.image_mpps(cfg.mpp)[:n]
    top_hits, anc_wrong, anc_total, predictions = 0, 0, 0, []
    field_hits: dict[str, list[int]] = {}
    for i in range(n):
        report = drafter.draft(ds.paths[i], cfg.kind, mpp=mpps[i])
        diff = report.morphologic_differential if hasattr(report, "morphologic_differential") else []
        top = diff[0].entity if diff else None
        truth = ENTITY_ALIASES.get(ds.labels[i], ds.labels[i])
        top_hits += int(top == truth)
        for name in anc_fields:
            anc_total += 1
            anc_wrong += int(getattr(getattr(report.fields, name), "value", None) is not None)
        for name, want in (truths[i] if i < len(truths) else {}).items():
            got = getattr(getattr(report.fields, name), "value", None)
            field_hits.setdefault(name, []).append(int(str(got).lower() == want.strip().lower()))
        predictions.append({"path": str(ds.paths[i]), "label": ds.labels[i], "top_entity": top,
                            "top_probability": diff[0].probability if diff else None})
    result = {
        "task": f"report {cfg.kind}", "model": model_name, "data": str(data), "n": n,
        **scale_summary(ds.paths[:n], mpps, tile_scale(model)),
        "top_entity_accuracy": top_hits / n if n else float("nan"),
        "field_accuracy": {k: sum(v) / len(v) for k, v in field_hits.items()},
        "ancillary_wrongly_filled_share": anc_wrong / anc_total if anc_total else 0.0,
        "ancillary_fields": anc_fields, "predictions": predictions,
    }
    if cfg.split:
        result["split"] = cfg.split
    if json_out:
        paths = write_report(result, json_out)
        rows = [("top_entity_accuracy", result["top_entity_accuracy"]),
                ("ancillary_wrongly_filled_share", result["ancillary_wrongly_filled_share"])]
        rows += [(f"field {k}", v) for k, v in result["field_accuracy"].items()]
        with paths["markdown"].open("a") as f:
            f.write("\n| report metric | value |\n|---|---|\n"
                    + "".join(f"| {k} | {v:.3f} |\n" for k, v in rows))
        result["files"] = {k: str(paths[k]) for k in ("json", "markdown")}
    return result
