"""Fit and measure the calibration of a model's image-decided heads on the labelled val split.

`fit_calibration(model, data_root)` scores every val image through the same path as reports
(`pathvlm.scoring`), fits temperature (multiclass) or Platt (binary) scaling per head, chooses
the report threshold for a target selective precision, and measures it twice: in-sample (fit and
measured on all of val) and cross-fitted (fit on half of the val specimens, measured on the other
half, both ways, pooled), so the cost of fitting and measuring on one split is visible.

    pathvlm calibrate --model demo --data ../shared/data     # writes calibration.json beside the weights
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pathvlm.calibration import (
    TARGET_PRECISION,
    Calibration,
    HeadCalibration,
    choose_threshold,
    fit_platt,
    fit_temperature,
    fit_top_label_isotonic,
    global_threshold,
    head_metrics,
    softmax,
)
from pathvlm.embed import encoder_views
from pathvlm.errors import ConfigError
from pathvlm.eval.datasets import load_csv
from pathvlm.provenance import provenance
from pathvlm.scoring import HEADS, Scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadData:
    """Where a head's val labels come from: a CSV below the data root, and how to read a label."""

    csv: str
    positive_label: str | None = None  # binary heads: the label meaning "present"
    label_map: Callable[[str], str] | None = None


# head -> its labelled val set (relative to the data root, ../shared/data)
HEAD_DATA = {
    "lymphoma_entity": HeadData("lymphoma_nia/index.csv"),
    "crc_tissue": HeadData("crc_tiles/index.csv"),
    "crc_tumor": HeadData("crc_tiles/index.csv", positive_label="TUM"),
    "node_tumor": HeadData("pcam/index.csv", positive_label="tumor"),
}


@dataclass
class HeadVal:
    """Raw pooled logits of one head on its val set, with labels and cross-fit folds."""

    head: str
    classes: list[str]
    logits: np.ndarray  # [N, C]
    labels: np.ndarray  # [N] class index (binary: 0 absent / 1 present)
    folds: np.ndarray  # [N] 0 or 1
    source: str


def _folds(labels: list[str], groups: list[str], seed: int = 0) -> np.ndarray:
    """Two halves, disjoint by group (specimen) and balanced per label."""
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for label in sorted(set(labels)):
        gs = sorted({g for g, lab in zip(groups, labels) if lab == label and g not in fold_of})
        rng.shuffle(gs)
        for i, g in enumerate(gs):
            fold_of[g] = i % 2
    return np.array([fold_of[g] for g in groups])


def collect(scorer: Scorer, model: Any, data_root: Path, heads: list[str],
            limit: int | None = None, progress: bool = True) -> dict[str, HeadVal]:
    """Score the val split of each head's data set (images shared by heads are scored once)."""
    from pathvlm.model.inputs import resolve_inputs
    from pathvlm.slide import TileConfig

    tile = TileConfig(mpp=model.cfg.tile_mpp, size=model.cfg.tile_size)
    out: dict[str, HeadVal] = {}
    by_csv: dict[str, list[str]] = {}
    for h in heads:
        by_csv.setdefault(HEAD_DATA[h].csv, []).append(h)
    for rel, names in by_csv.items():
        path = data_root / rel
        if not path.is_file():
            log.warning("%s missing: heads %s not calibrated", path, ", ".join(names))
            continue
        ds = load_csv(path, "val")
        n = len(ds) if limit is None else min(limit, len(ds))
        if n < len(ds):  # evenly spaced rows: the CSVs are grouped by class, so all stay in
            ds = ds.subset(sorted({int(i) for i in np.linspace(0, len(ds) - 1, n).round()}))
        logits: dict[str, list[np.ndarray]] = {h: [] for h in names}
        classes: dict[str, list[str]] = {}
        it = range(len(ds))
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=f"calibrate {rel}", leave=False)
        for i in it:
            slides = resolve_inputs(ds.paths[i], model.encoder, model.transform, tile)
            s = scorer.score_slides(slides)[0]
            for h in names:
                logits[h].append(s.heads[h].logits)
                classes[h] = s.heads[h].classes
        groups = ds.specimens or [str(p) for p in ds.paths]
        folds = _folds(ds.labels, groups)
        for h in names:
            spec = HEAD_DATA[h]
            if spec.positive_label is not None:
                y = np.array([int(lab == spec.positive_label) for lab in ds.labels])
            else:
                missing = sorted(set(ds.labels) - set(classes[h]))
                if missing:
                    raise ConfigError(f"{path}: labels {missing} are not classes of head {h} "
                                      f"({classes[h]})")
                y = np.array([classes[h].index(lab) for lab in ds.labels])
            out[h] = HeadVal(h, classes[h], np.stack(logits[h]), y, folds, str(path))
    return out


def _fit(val: HeadVal, idx: np.ndarray) -> tuple[str, dict[str, Any]]:
    """Platt for binary heads; temperature (NLL) then top-label isotonic for multiclass ones:
    temperature alone cannot fix confidences that do not rank correctness (ECE stays ~0.15 on
    the lymphoma val split with the first demo model)."""
    if HEADS[val.head].binary:
        a, b = fit_platt(val.logits[idx, 1] - val.logits[idx, 0], val.labels[idx])
        return "platt", {"a": a, "b": b}
    t = fit_temperature(val.logits[idx], val.labels[idx])
    p = softmax(val.logits[idx] / t)
    xs, ys = fit_top_label_isotonic(p.max(1), p.argmax(1) == val.labels[idx])
    return "temperature_isotonic", {"temperature": t, "iso_x": xs, "iso_y": ys}


def confidence_correct(val: HeadVal, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a field fills and whether it is right: the top class (multiclass), or "present"
    (binary heads fill only a positive finding: absence on a slide proves nothing)."""
    if HEADS[val.head].binary:
        return probs[:, 1], val.labels.astype(float)
    return probs.max(1), (probs.argmax(1) == val.labels).astype(float)


def _metrics(val: HeadVal, probs: np.ndarray, threshold: float | None) -> dict[str, Any]:
    m = head_metrics(*confidence_correct(val, probs), threshold)
    if HEADS[val.head].binary:  # accuracy of the p >= 0.5 decision, not the prevalence
        m["accuracy"] = float(((probs[:, 1] >= 0.5) == (val.labels == 1)).mean())
    return m


def _apply(val: HeadVal, method: str, params: dict[str, float], idx: np.ndarray) -> np.ndarray:
    return HeadCalibration(method, params, val.classes).probs(val.logits[idx])


def fit_calibration(model: Any, data_root: str | Path, heads: list[str] | None = None,
                    target: float = TARGET_PRECISION, limit: int | None = None,
                    progress: bool = True) -> Calibration:
    """Fit every head that has labelled val data under `data_root`; see the module docstring."""
    t0 = time.perf_counter()
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise ConfigError(f"{data_root}: data folder not found (pass --data, e.g. ../shared/data)")
    heads = heads or list(HEADS)
    scorer = Scorer(model, calibration=None, heads=heads)
    if scorer.unavailable:
        raise ConfigError(f"cannot calibrate: {scorer.unavailable}")
    vals = collect(scorer, model, data_root, heads, limit, progress)
    if not vals:
        raise ConfigError(f"{data_root}: none of {', '.join(HEAD_DATA[h].csv for h in heads)} "
                          "found")
    everything = {h: np.arange(len(v.labels)) for h, v in vals.items()}
    fitted = {h: _fit(v, everything[h]) for h, v in vals.items()}
    cc = {h: confidence_correct(v, _apply(v, *fitted[h], everything[h])) for h, v in vals.items()}
    t_global = global_threshold(cc, target)
    cross = _cross_fit(vals, target)
    out: dict[str, HeadCalibration] = {}
    for h, v in vals.items():
        method, params = fitted[h]
        conf, corr = cc[h]
        metrics = {"data": v.source, "split": "val", "classes_in_data": sorted(
                       {v.classes[i] for i in v.labels} if not HEADS[h].binary else {"absent",
                                                                                     "present"}),
                   "uncalibrated": _metrics(v, _softmax_rows(v.logits), None),
                   "in_sample": _metrics(v, _apply(v, method, params, everything[h]), t_global),
                   "cross_fit": cross[h],
                   "head_threshold": choose_threshold(conf, corr, target)}
        out[h] = HeadCalibration(method, params, v.classes, scorer.prompts_digest(h),
                                 top_k=DEFAULT_K, threshold=metrics["head_threshold"],
                                 metrics=metrics,
                                 class_embeddings=np.round(scorer.class_embeddings(h), 6).tolist())
    meta = {"data_root": str(data_root), "split": "val", "fitted_at":
            datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance(),  # version + commit (pathvlm.provenance)
            "seconds": round(time.perf_counter() - t0, 1), "limit": limit,
            "model": getattr(model, "run_dir", None) and Path(model.run_dir).name,
            # the scores were computed with the encoder in this precision (`auto` may keep it fp32)
            "encoder_precision": str(getattr(model.encoder, "precision", "fp32")),
            "encoder_test_views": encoder_views(model.encoder)}
    return Calibration(out, t_global, target, model.encoder.weights_hash, meta)


DEFAULT_K = 10


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    return softmax(x)


def _cross_fit(vals: dict[str, HeadVal], target: float) -> dict[str, dict[str, Any]]:
    """Fit on one half of val (and choose the threshold there), measure on the other; pooled."""
    held: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {h: [] for h in vals}
    for f in (0, 1):
        fit_idx = {h: np.flatnonzero(v.folds == f) for h, v in vals.items()}
        test_idx = {h: np.flatnonzero(v.folds != f) for h, v in vals.items()}
        fitted = {h: _fit(v, fit_idx[h]) for h, v in vals.items() if len(fit_idx[h])}
        cc_fit = {h: confidence_correct(_sub(v, fit_idx[h]), _apply(v, *fitted[h], fit_idx[h]))
                  for h, v in vals.items() if h in fitted}
        t = global_threshold(cc_fit, target)
        for h, v in vals.items():
            if h not in fitted or not len(test_idx[h]):
                continue
            conf, corr = confidence_correct(_sub(v, test_idx[h]),
                                            _apply(v, *fitted[h], test_idx[h]))
            keep = conf >= t if t is not None else np.zeros_like(conf, bool)
            held[h].append((conf, corr, keep))
    out = {}
    for h, parts in held.items():
        if not parts:
            out[h] = {}
            continue
        conf = np.concatenate([p[0] for p in parts])
        corr = np.concatenate([p[1] for p in parts])
        keep = np.concatenate([p[2] for p in parts])
        m = head_metrics(conf, corr, None)
        if HEADS[h].binary:
            m["accuracy"] = float(((conf >= 0.5) == (corr == 1)).mean())
        m.update({"coverage": float(keep.mean()), "n_filled": int(keep.sum()),
                  "selective_accuracy": float(corr[keep].mean()) if keep.any() else None})
        out[h] = m
    return out


def _sub(v: HeadVal, idx: np.ndarray) -> HeadVal:
    return HeadVal(v.head, v.classes, v.logits[idx], v.labels[idx], v.folds[idx], v.source)


def summary_rows(cal: Calibration) -> list[dict[str, Any]]:
    """One row per head for the model card / console: in-sample and cross-fitted figures."""
    rows = []
    for h, hc in cal.heads.items():
        ins, cf = hc.metrics.get("in_sample", {}), hc.metrics.get("cross_fit", {})
        rows.append({"head": h, "description": HEADS[h].description if h in HEADS else "",
                     "method": hc.method, "params": hc.params, "n": ins.get("n"),
                     "accuracy": ins.get("accuracy"),
                     "ece_uncalibrated": hc.metrics.get("uncalibrated", {}).get("ece"),
                     "ece": ins.get("ece"), "coverage": ins.get("coverage"),
                     "selective_accuracy": ins.get("selective_accuracy"),
                     "ece_cross_fit": cf.get("ece"), "coverage_cross_fit": cf.get("coverage"),
                     "selective_accuracy_cross_fit": cf.get("selective_accuracy")})
    return rows


def markdown_table(cal: Calibration) -> str:
    """The MODEL_CARD table."""
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)

    t = cal.min_confidence
    lines = [(f"Threshold in force (`min_confidence`): **{f(t)}**, chosen on val for selective "
             f"precision {cal.target_precision:.2f}."), "",
             ("| head | n (val) | accuracy | ECE raw | ECE calibrated | coverage | selective acc. "
             "| ECE cross-fit | coverage cross-fit | selective acc. cross-fit |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary_rows(cal):
        lines.append(f"| {r['head']} ({r['description']}) | {r['n']} | {f(r['accuracy'])} | "
                     f"{f(r['ece_uncalibrated'])} | {f(r['ece'])} | {f(r['coverage'])} | "
                     f"{f(r['selective_accuracy'])} | {f(r['ece_cross_fit'])} | "
                     f"{f(r['coverage_cross_fit'])} | {f(r['selective_accuracy_cross_fit'])} |")
    return "\n".join(lines) + "\n"
