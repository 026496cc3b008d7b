"""`pathvlm eval linear-probe` / `few-shot`: classifiers on frozen image embeddings.

The linear probe fits a standardised logistic regression on every training image. Few-shot draws
k training images per class (several seeds; the mean over seeds is reported) and classifies by
SimpleShot (Wang et al. 2019, as in the UNI few-shot benchmarks): embeddings centred on the mean of
the k x classes support images, L2-normalised, nearest class centroid. A logistic regression on a
standardised support set is not used for few-shot: at k = 1 the scaler divides each dimension by
half the distance between two images, so a 0.3% change of the embeddings (bf16 vs fp32) moved
PCam 1-shot from 0.74 to 0.59.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pathvlm.errors import ConfigError
from pathvlm.eval.common import EvalModel, ImageSequence, Perturbation, embed_dataset, scale_summary
from pathvlm.eval.datasets import LabeledDataset, load_dataset
from pathvlm.eval.metrics import classification_metrics, metric_cis, save_confusion_png
from pathvlm.eval.report import output_paths, write_report
from pathvlm.zeroshot import tile_scale

log = logging.getLogger(__name__)


@dataclass
class LinearProbeConfig:
    """Options of a linear-probe or few-shot evaluation."""

    train: str = ""
    test: str = ""
    train_split: str | None = None
    test_split: str | None = None
    k: int | None = None  # images per class for few-shot; None = all (linear probe)
    n_seeds: int = 5  # few-shot repeats
    c: float = 1.0  # inverse L2 regularisation strength of the logistic regression
    max_iter: int = 2000
    batch_size: int = 64
    n_boot: int = 1000
    seed: int = 0
    resize_mpp_factor: float = 1.0  # applied to test images only
    stain_jitter: float = 0.0
    mpp: float | None = None  # um/px of images without their own (CSV 'mpp' column wins)


def fit_predict(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float, max_iter: int, seed: int
) -> np.ndarray:
    """Standardise on the training set, fit multinomial logistic regression; test probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    )
    clf.fit(train_x, train_y)
    probs = np.zeros((len(test_x), int(train_y.max()) + 1))
    probs[:, clf.classes_] = clf.predict_proba(test_x)
    return probs


def simpleshot_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                       n_classes: int, temperature: float = 0.1) -> np.ndarray:
    """Nearest centroid on centred, L2-normalised embeddings (SimpleShot "CL2N"); [N_test, C]
    scores = softmax of the cosine to each class centroid / ``temperature`` (a fixed scale, so
    the few-shot ECE is of these scores, not of fitted probabilities). A class without support
    images gets probability 0."""
    mean = train_x.mean(axis=0, keepdims=True)

    def unit(x: np.ndarray) -> np.ndarray:
        x = x - mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    support, query = unit(train_x), unit(test_x)
    present = np.unique(train_y)
    centroids = np.stack([support[train_y == c].mean(axis=0) for c in present])  # [C', D]
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    logits = query @ centroids.T / temperature  # [N_test, C']
    logits -= logits.max(axis=1, keepdims=True)
    scores = np.exp(logits)
    probs = np.zeros((len(test_x), n_classes))
    probs[:, present] = scores / scores.sum(axis=1, keepdims=True)
    return probs


def sample_k_per_class(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of k random items of every class (all of a class that has fewer, with a warning)."""
    picks = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            log.warning("class %s has only %d training images (< k=%d)", c, len(members), k)
        picks.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(picks))


def _embed(
    model: EvalModel, data: LabeledDataset, cfg: LinearProbeConfig, perturb: Perturbation | None
):
    x = embed_dataset(
        model.encoder, model.transform, ImageSequence(data.paths, perturb), cfg.batch_size,
        mpp=data.image_mpps(cfg.mpp), target_mpp=tile_scale(model.model),
    )
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_linear_probe(
    model: EvalModel, cfg: LinearProbeConfig, json_path: str | Path | None = None
) -> dict[str, Any]:
    """Embed train and test sets with the frozen encoder, fit, score; write reports if asked."""
    if model.encoder is None:
        raise ConfigError(f"model {model.name} has no image encoder to probe")
    train = load_dataset(cfg.train, cfg.train_split)
    test = load_dataset(cfg.test, cfg.test_split)
    classes = sorted(set(train.labels))
    unknown = sorted(set(test.labels) - set(classes))
    if unknown:
        raise ConfigError(
            f"{cfg.test}: test labels {unknown} do not occur in the training set {cfg.train}"
        )
    if len(classes) < 2:
        raise ConfigError(f"{cfg.train}: a probe needs at least two classes, found {classes}")
    train_y = np.array([classes.index(lab) for lab in train.labels])
    test_y = np.array([classes.index(lab) for lab in test.labels])
    perturb = Perturbation(cfg.resize_mpp_factor, cfg.stain_jitter, cfg.seed)
    train_x = _embed(model, train, cfg, None)  # [N_train, D]
    test_x = _embed(model, test, cfg, perturb)  # [N_test, D]

    runs = []
    seeds = range(cfg.seed, cfg.seed + (cfg.n_seeds if cfg.k else 1))
    for seed in seeds:
        idx = (
            sample_k_per_class(train_y, cfg.k, np.random.default_rng(seed))
            if cfg.k
            else np.arange(len(train_y))
        )
        if cfg.k:
            probs = simpleshot_predict(train_x[idx], train_y[idx], test_x, len(classes))
        else:
            probs = fit_predict(train_x[idx], train_y[idx], test_x, cfg.c, cfg.max_iter, seed)
        runs.append((seed, probs))

    first_probs = runs[0][1]
    first_pred = first_probs.argmax(axis=1)
    result: dict[str, Any] = {
        "task": "few-shot" if cfg.k else "linear-probe",
        **model.info(),
        "data": {"train": str(cfg.train), "test": str(cfg.test)},
    }
    result.update(classification_metrics(test_y, first_pred, classes, first_probs))
    present = sorted(set(test_y.tolist()))
    result["per_class_recall"] = {
        classes[i]: result["per_class_recall"][classes[i]] for i in present
    }
    result["ci95"] = metric_cis(
        test_y, first_pred, len(classes), test.specimens, cfg.n_boot, cfg.seed
    )
    if cfg.k:
        per_seed = [classification_metrics(test_y, p.argmax(axis=1), classes, p) for _, p in runs]
        for key in ("accuracy", "balanced_accuracy", "weighted_f1", "ece"):
            result[key] = float(np.mean([m[key] for m in per_seed]))
        result["per_seed"] = [
            {
                "seed": s,
                "balanced_accuracy": m["balanced_accuracy"],
                "weighted_f1": m["weighted_f1"],
            }
            for (s, _), m in zip(runs, per_seed)
        ]
        result["balanced_accuracy_std"] = float(np.std([m["balanced_accuracy"] for m in per_seed]))
        result["ci95_note"] = (
            "ci95, per_class_recall and confusion_matrix are of the first seed; "
            "headline metrics are means over seeds"
        )
    result.update(
        {
            "k": cfg.k,
            "n_train": len(train_y),
            "classes": classes,
            "probe": {
                "model": "SimpleShot: centred on the support mean, L2-normalised, nearest class "
                "centroid (scores: softmax of cosine / 0.1)",
                "features": "L2-normalised image embeddings",
            } if cfg.k else {
                "model": "StandardScaler + LogisticRegression",
                "C": cfg.c,
                "max_iter": cfg.max_iter,
                "features": "L2-normalised image embeddings",
            },
            "split": {"train": cfg.train_split, "test": cfg.test_split},
            "prompts": None,
            "perturbation": perturb.describe() if perturb.active else None,
            **scale_summary(train.paths + test.paths,
                            train.image_mpps(cfg.mpp) + test.image_mpps(cfg.mpp),
                            tile_scale(model.model)),
        }
    )
    if json_path is not None:
        paths = output_paths(json_path)
        save_confusion_png(
            np.array(result["confusion_matrix"]["counts"]),
            classes,
            paths["confusion_png"],
            title=f"{result['task']}: {model.name}",
        )
        result["files"] = {k: str(v) for k, v in paths.items() if k != "predictions"}
        write_report(result, paths["json"])
    return result
