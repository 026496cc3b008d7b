"""Eval reports: the metrics JSON, a Markdown summary, beside what is needed to reproduce them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pathvlm import __version__


def output_paths(json_path: str | Path) -> dict[str, Path]:
    """Sibling files of an eval's ``--json OUT``: Markdown, confusion PNG, predictions CSV."""
    json_path = Path(json_path)
    stem = json_path.with_suffix("")
    return {
        "json": json_path,
        "markdown": json_path.with_suffix(".md"),
        "confusion_png": Path(f"{stem}_confusion.png"),
        "predictions": Path(f"{stem}_predictions.csv"),
    }


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def to_markdown(result: dict[str, Any]) -> str:
    """A human summary: headline metrics with 95% CIs, per-class recall, provenance."""
    ci = result.get("ci95", {})
    lines = [
        f"# pathvlm eval {result.get('task', '')}",
        "",
        f"- model: `{result.get('model')}` (weights hash `{result.get('weights_hash')}`)",
        f"- data: `{result.get('data')}`, n = {result.get('n')}",
        f"- pathvlm {result.get('pathvlm_version', __version__)}",
    ]
    if result.get("perturbation"):
        lines.append(f"- perturbation: {json.dumps(result['perturbation'])}")
    if result.get("decoding"):
        lines.append(f"- decoding: {json.dumps(result['decoding'])}")
    lines += ["", "| metric | value | 95% CI |", "|---|---|---|"]
    for key in (
        "balanced_accuracy",
        "weighted_f1",
        "accuracy",
        "ece",
        "option_order_consistency",
        "mc_accuracy",
        "mc_letter_matches_name",
        "yesno_accuracy",
    ):
        if key in result:
            lo, hi = ci.get(key, (None, None))
            interval = f"{_fmt(lo)} - {_fmt(hi)}" if lo is not None else ""
            lines.append(f"| {key} | {_fmt(result[key])} | {interval} |")
    recall = result.get("per_class_recall") or {}
    if recall:
        lines += ["", "| class | recall |", "|---|---|"]
        lines += [f"| {c} | {_fmt(r)} |" for c, r in recall.items()]
    prompts = result.get("prompts")
    if isinstance(prompts, dict) and prompts.get("classes"):
        n_templates = len(prompts.get("templates", []))
        lines += [
            "",
            f"Prompts ({prompts.get('source', 'inline')}): "
            + f"{len(prompts['classes'])} classes x {n_templates} templates.",
        ]
        lines += [f"- {k}: {', '.join(v)}" for k, v in prompts["classes"].items()]
    if result.get("files", {}).get("confusion_png"):
        lines += ["", f"![confusion matrix]({Path(result['files']['confusion_png']).name})"]
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], json_path: str | Path) -> dict[str, Path]:
    """Write ``result`` as JSON at ``json_path`` and Markdown beside it; returns the paths."""
    paths = output_paths(json_path)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    result.setdefault("pathvlm_version", __version__)
    paths["json"].write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    paths["markdown"].write_text(to_markdown(result))
    return paths


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
