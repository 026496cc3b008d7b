"""`pathvlm eval zeroshot`: zero-shot classification of a labelled image set, metrics and CIs."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathvlm.eval.common import EvalModel, ImageSequence, Perturbation, scale_summary
from pathvlm.eval.datasets import LabeledDataset, load_dataset, match_classes
from pathvlm.eval.metrics import classification_metrics, metric_cis, save_confusion_png
from pathvlm.eval.report import output_paths, write_report
from pathvlm.resources import resolve_resource
from pathvlm.zeroshot import PromptSet, ZeroShotClassifier, make_prompt_set

log = logging.getLogger(__name__)


@dataclass
class ZeroShotEvalConfig:
    """Options of a zero-shot evaluation (see `pathvlm eval zeroshot --help`)."""

    prompts: str | None = None  # prompt file or packaged name; else `classes`; else the data's labels
    classes: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    all_classes: bool = False  # let every prompt class compete, not only those in the data
    split: str | None = None
    batch_size: int = 64
    n_boot: int = 1000
    seed: int = 0
    resize_mpp_factor: float = 1.0
    stain_jitter: float = 0.0
    mpp: float | None = None  # um/px of images without their own (CSV 'mpp' column wins)


def build_prompt_set(cfg: ZeroShotEvalConfig, data: LabeledDataset) -> PromptSet:
    if cfg.prompts:
        return make_prompt_set(resolve_resource("prompts", cfg.prompts), cfg.templates or None)
    return make_prompt_set(cfg.classes or data.classes, cfg.templates or None)


def run_zeroshot_eval(
    model: EvalModel,
    data_source: str | Path,
    cfg: ZeroShotEvalConfig,
    json_path: str | Path | None = None,
) -> dict[str, Any]:
    """Classify every image and score it; write JSON, Markdown, PNG and CSV when ``json_path``."""
    data = load_dataset(data_source, cfg.split)
    prompt_set = build_prompt_set(cfg, data)
    label_map = match_classes(data.labels, prompt_set)  # data label -> prompt class
    if not cfg.all_classes:
        present = set(label_map.values())
        prompt_set = prompt_set.subset([k for k in prompt_set.names if k in present])
    clf = ZeroShotClassifier(
        model.model, prompts=prompt_set, transform=model.transform, batch_size=cfg.batch_size
    )
    perturb = Perturbation(cfg.resize_mpp_factor, cfg.stain_jitter, cfg.seed)
    images = ImageSequence(data.paths, perturb)
    mpps = data.image_mpps(cfg.mpp)
    logits = clf.logits_from_embeddings(clf.embed_images(images, desc="eval zeroshot", mpp=mpps))
    probs = _softmax(logits)
    classes = clf.classes
    y_true = np.array([classes.index(label_map[lab]) for lab in data.labels])
    y_pred = probs.argmax(axis=1)

    result: dict[str, Any] = {"task": "zeroshot", **model.info(), "data": str(data_source)}
    result.update(classification_metrics(y_true, y_pred, classes, probs))
    present = sorted(set(y_true.tolist()))
    result["per_class_recall"] = {
        classes[i]: result["per_class_recall"][classes[i]] for i in present
    }
    result["ci95"] = metric_cis(y_true, y_pred, len(classes), data.specimens, cfg.n_boot, cfg.seed)
    result["ci95_resampling"] = "specimen" if data.specimens else "image"
    result.update(
        {
            "prompts": clf.prompt_set.to_dict(),
            "label_map": label_map,
            "competing_classes": classes,
            "logit_scale": clf.logit_scale,
            "split": cfg.split,
            "perturbation": perturb.describe() if perturb.active else None,
            **scale_summary(data.paths, mpps, clf.tile_mpp),
        }
    )
    if json_path is not None:
        paths = output_paths(json_path)
        cm = np.array(result["confusion_matrix"]["counts"])
        save_confusion_png(cm, classes, paths["confusion_png"], title=f"zero-shot: {model.name}")
        write_predictions(paths["predictions"], data, classes, probs)
        result["files"] = {k: str(v) for k, v in paths.items()}
        write_report(result, paths["json"])
    return result


def write_predictions(
    path: Path, data: LabeledDataset, classes: list[str], probs: np.ndarray
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "predicted", *classes])
        for p, lab, row in zip(data.paths, data.labels, probs):
            writer.writerow([str(p), lab, classes[int(row.argmax())], *(f"{v:.6f}" for v in row)])


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
