"""Measured honesty of drafted reports: per image-decided field that val can label, coverage and
selective accuracy at the threshold in force, and ECE, read from the reports themselves.

Fields and their labelled val sets (below the data root, ../shared/data):
  lymphoma entity (differential top entity)      lymphoma_nia/index.csv   lymphoma report
  colorectal tissue composition (predominant)    crc_tiles/index.csv      colorectal biopsy report
  carcinoma present (histologic type filled)     crc_tiles/index.csv      colorectal biopsy report
  tumour in a lymph node (node status filled)    pcam/index.csv           resection, node slide

    pathvlm eval report --model demo --data ../shared/data --json runs/eval/report_fields.json
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathvlm.calibration import head_metrics
from pathvlm.eval.datasets import load_csv
from pathvlm.reports.tables import ENTITY_ALIASES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldSet:
    name: str  # the field as the report shows it
    head: str  # the calibrated head behind it (pathvlm.scoring)
    csv: str
    kind: str  # report type drafted
    role: str | None = None  # case role the image gets (node fields need "lymph_node")


FIELD_SETS = (
    FieldSet("lymphoma entity", "lymphoma_entity", "lymphoma_nia/index.csv", "lymphoma"),
    FieldSet("colorectal tissue composition", "crc_tissue", "crc_tiles/index.csv",
             "colorectal_biopsy"),
    FieldSet("carcinoma present", "crc_tumor", "crc_tiles/index.csv", "colorectal_biopsy"),
    FieldSet("tumour in a lymph node", "node_tumor", "pcam/index.csv", "colorectal_resection",
             role="lymph_node"),
)


def is_suite_root(path: str | Path) -> bool:
    """True when `path` is a data root holding at least one of the labelled val sets."""
    p = Path(path)
    return p.is_dir() and any((p / fs.csv).is_file() for fs in FIELD_SETS)


def _entry_p(entry: dict[str, Any]) -> float:
    """Probability of the field's (single) value, filled or only considered."""
    if entry.get("value") is not None and entry.get("confidence") is not None:
        return float(entry["confidence"])
    considered = entry.get("considered") or []
    return float(considered[0]["probability"]) if considered else 0.0


def read_outcome(fs: FieldSet, data: dict[str, Any], label: str) -> tuple[float, bool, bool]:
    """(probability of what the report offers, whether it is filled, whether that is right)."""
    t = data.get("min_confidence")
    if fs.head == "lymphoma_entity":
        ddx = data.get("morphologic_differential") or []
        if not ddx:
            return 0.0, False, False
        p = ddx[0]["probability"]
        return p, t is not None and p >= t, ddx[0]["entity"] == ENTITY_ALIASES.get(label, label)
    if fs.head == "crc_tissue":
        pred = (data.get("tissue_composition") or {}).get("predominant")
        if not pred:
            return 0.0, False, False
        return pred["probability"], bool(pred["determined"]), pred["class"] == label
    positive = {"crc_tumor": "TUM", "node_tumor": "tumor"}[fs.head]
    name = "histologic_type" if fs.head == "crc_tumor" else "regional_lymph_node_status"
    entry = data["fields"][name]
    return _entry_p(entry), entry.get("value") is not None, label == positive


def _draft_one(drafter: Any, fs: FieldSet, path: Path, min_confidence: float | None) -> dict:
    from pathvlm.case import Case, SlideRef

    item: Any = str(path)
    if fs.role:
        item = Case(id=path.stem, slides=[SlideRef(path=path, role=fs.role)])
    return drafter.draft(item, fs.kind, min_confidence=min_confidence).to_json_dict()


def run_field_suite(model: Any, data_root: str | Path, limit: int | None = None,
                    min_confidence: float | None = None, progress: bool = True
                    ) -> dict[str, Any]:
    """Draft a report for every val image of each labelled set; measure each field.

    Binary fields ("carcinoma present", "tumour in a lymph node") are filled only for a
    positive finding, so their selective accuracy is the precision of what they fill and their
    ECE is that of the probability of "present" against the label.
    """
    from pathvlm.reports.from_model import FindingsConfig, ReportDrafter

    t0 = time.perf_counter()
    root = Path(data_root)
    drafter = ReportDrafter(model, FindingsConfig())
    cal = getattr(model, "calibration", None)
    out: dict[str, Any] = {"task": "report fields", "data": str(root), "split": "val",
                           "fields": {}, "min_confidence": None}
    drafted: dict[tuple[str, str], list[tuple[str, dict]]] = {}
    for fs in FIELD_SETS:
        csv_path = root / fs.csv
        if not csv_path.is_file():
            log.warning("%s missing: %s not measured", csv_path, fs.name)
            continue
        key = (fs.csv, fs.kind)
        if key not in drafted:
            ds = load_csv(csv_path, "val")
            idx = range(len(ds))
            if limit is not None and limit < len(ds):
                idx = sorted({int(i) for i in np.linspace(0, len(ds) - 1, limit).round()})
            it = idx
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(idx, desc=f"eval report {fs.csv}", leave=False)
            drafted[key] = [(ds.labels[i], _draft_one(drafter, fs, ds.paths[i], min_confidence))
                            for i in it]
        rows = [read_outcome(fs, data, label) for label, data in drafted[key]]
        p = np.array([r[0] for r in rows])
        filled = np.array([r[1] for r in rows])
        right = np.array([r[2] for r in rows], dtype=float)
        binary = fs.head in ("crc_tumor", "node_tumor")
        m = head_metrics(p, right, None)
        if binary:  # accuracy of the p >= 0.5 decision; ECE of P(present)
            m["accuracy"] = float(((p >= 0.5) == (right == 1)).mean())
        m.update({"coverage": float(filled.mean()), "n_filled": int(filled.sum()),
                  "selective_accuracy": float(right[filled].mean()) if filled.any() else None,
                  "data": str(csv_path), "report_type": fs.kind, "head": fs.head})
        if cal is not None and fs.head in cal.heads:
            m["cross_fit"] = cal.heads[fs.head].metrics.get("cross_fit")
        out["fields"][fs.name] = m
        out["min_confidence"] = drafted[key][0][1]["min_confidence"] if drafted[key] else None
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["n"] = sum(m["n"] for m in out["fields"].values())
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The MODEL_CARD table of `run_field_suite`."""
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    t = result.get("min_confidence")
    lines = [f"Threshold in force (`min_confidence`): {f(t)}.", "",
             ("| field (val set) | n | accuracy | coverage | selective accuracy | ECE | "
             "cross-fit: coverage / selective acc. / ECE |"), "|---|---|---|---|---|---|---|"]
    for name, m in result["fields"].items():
        cf = m.get("cross_fit") or {}
        cross = (f"{f(cf.get('coverage'))} / {f(cf.get('selective_accuracy'))} / "
                 f"{f(cf.get('ece'))}" if cf else "-")
        lines.append(f"| {name} ({Path(m['data']).parent.name}) | {m['n']} | {f(m['accuracy'])} "
                     f"| {f(m['coverage'])} | {f(m['selective_accuracy'])} | {f(m['ece'])} | "
                     f"{cross} |")
    return "\n".join(lines) + "\n"
