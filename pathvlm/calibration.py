"""Calibration of image-decided scores: temperature / Platt scaling, ECE, selective thresholds.

Pure numpy, no model: `pathvlm.scoring` applies a `Calibration` to the zero-shot logits of a
model, and `pathvlm.reports.calibrate` fits one on the labelled val split and writes it as
`calibration.json` beside the model's weights (`load_model` reads it back).

A head's threshold is the smallest probability at which the val predictions at or above it reach
the target selective precision (default 0.9); the report threshold in force (`min_confidence`)
is the smallest one at which every head reaches it or abstains on all of val.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pathvlm.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "pathvlm-calibration/1"
FILE_NAME = "calibration.json"
TARGET_PRECISION = 0.9
MIN_SUPPORT = 5  # a threshold needs at least this many val predictions at or above it
ECE_BINS = 10


# -- scaling ----------------------------------------------------------------------------------
def softmax(x: np.ndarray) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def _nll_temperature(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    p = softmax(logits / t)
    return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T); logits [N, C], labels [N].

    A 1-D search over log T (coarse grid, then golden section around the best point): no
    optimiser state, deterministic, and T stays in [0.01, 100].
    """
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    if len(labels) == 0:
        raise ConfigError("cannot fit a temperature on no samples")
    grid = np.linspace(math.log(0.01), math.log(100.0), 61)
    losses = [_nll_temperature(logits, labels, math.exp(g)) for g in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if _nll_temperature(logits, labels, math.exp(a)) < _nll_temperature(logits, labels,
                                                                              math.exp(b)):
            hi = b
        else:
            lo = a
    return float(math.exp((lo + hi) / 2))


def fit_platt(z: np.ndarray, y: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """(a, b) of p = sigmoid(a * z + b) minimising the NLL (Newton's method, tiny ridge).

    Platt's target smoothing ((n+ + 1) / (n+ + 2)) keeps a perfectly separated val set from
    driving the slope to infinity, i.e. from earning 1.0 confidences on a few dozen samples.
    """
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    if len(y) == 0:
        raise ConfigError("cannot fit Platt scaling on no samples")
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    scale = float(z.std()) or 1.0
    x = np.stack([z / scale, np.ones_like(z)], axis=1)  # [N, 2]
    w = np.zeros(2)
    for _ in range(iters):
        p = sigmoid(x @ w)
        grad = x.T @ (p - t) + 1e-6 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0] / scale), float(w[1])


def fit_top_label_isotonic(confidence: np.ndarray, correct: np.ndarray
                           ) -> tuple[list[float], list[float]]:
    """Knots (x, y) of a monotone map from top-1 confidence to P(top-1 correct).

    Isotonic regression (pool-adjacent-violators); each pooled block's accuracy is smoothed
    Laplace-style ((k + 1) / (n + 2)), so a block of 15 right answers maps to 0.94, not 1.0.
    """
    from sklearn.isotonic import IsotonicRegression

    conf, corr = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    fitted = iso.fit_transform(conf, corr)
    smooth = {}
    for value in np.unique(fitted):
        block = fitted == value
        smooth[float(value)] = float((corr[block].sum() + 1.0) / (block.sum() + 2.0))
    xs = [float(x) for x in iso.X_thresholds_]
    ys = [smooth[float(min(smooth, key=lambda v: abs(v - y)))] for y in iso.y_thresholds_]
    return xs, ys


def top_label_map(probs: np.ndarray, xs: list[float], ys: list[float]) -> np.ndarray:
    """Replace each row's top probability c by the isotonic map g(c) and rescale the others to
    sum to 1 - g(c); g is raised where needed so the top class stays on top (ranks never change).
    """
    p = np.array(probs, dtype=np.float64, copy=True)
    flat = p.reshape(-1, p.shape[-1])
    top = flat.argmax(1)
    rows = np.arange(len(flat))
    c = flat[rows, top]
    g = np.interp(c, xs, ys) if len(xs) else c
    others = flat.copy()
    others[rows, top] = 0.0
    second = others.max(1)
    g = np.maximum(g, second / np.maximum(1.0 - c + second, 1e-12))  # keep the ranking
    scale = np.where(c < 1.0, (1.0 - g) / np.maximum(1.0 - c, 1e-12), 0.0)
    flat[:] = others * scale[:, None]
    flat[rows, top] = g
    return flat.reshape(p.shape)


# -- measures ---------------------------------------------------------------------------------
def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of top-1 confidences (equal-width bins, weighted by count)."""
    conf, corr = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if len(conf) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(conf[m].mean() - corr[m].mean())
    return float(total / len(conf))


def selective(confidence: np.ndarray, correct: np.ndarray, threshold: float | None
              ) -> tuple[float, float | None, int]:
    """(coverage, selective accuracy or None when nothing is kept, number kept) at `threshold`."""
    conf, corr = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if threshold is None or len(conf) == 0:
        return 0.0, None, 0
    keep = conf >= threshold
    n = int(keep.sum())
    return n / len(conf), (float(corr[keep].mean()) if n else None), n


def choose_threshold(confidence: np.ndarray, correct: np.ndarray,
                     target: float = TARGET_PRECISION, min_support: int = MIN_SUPPORT
                     ) -> float | None:
    """Smallest observed confidence t with selective accuracy >= target over confidences >= t
    and at least `min_support` of them; None when no such t exists (the head always abstains)."""
    conf, corr = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    order = np.argsort(-conf)
    c, k = conf[order], np.cumsum(corr[order])
    best = None
    for i in range(len(c)):
        if i + 1 < len(c) and c[i + 1] == c[i]:
            continue  # ties: a threshold keeps all equal confidences
        n = i + 1
        if n >= min_support and k[i] / n >= target:
            best = float(c[i])
    return best


def head_metrics(confidence: np.ndarray, correct: np.ndarray, threshold: float | None
                 ) -> dict[str, Any]:
    cov, acc, n = selective(confidence, correct, threshold)
    return {"n": len(confidence), "accuracy": float(np.mean(correct)) if len(correct) else None,
            "ece": ece(confidence, correct), "mean_confidence": float(np.mean(confidence))
            if len(confidence) else None, "coverage": cov, "selective_accuracy": acc,
            "n_filled": n}


# -- the file ---------------------------------------------------------------------------------
@dataclass
class HeadCalibration:
    """Scaling of one head's pooled logits.

    Attributes:
        method: "temperature" (multiclass: softmax(logits / T)), "temperature_isotonic" (then
            the top probability mapped by isotonic regression, ranks kept) or "platt" (binary:
            sigmoid(a z + b)).
        params: {"temperature": T[, "iso_x": [...], "iso_y": [...]]} or {"a": a, "b": b}.
        classes: the head's classes, in logit order.
        prompts_digest: digest of the prompt set the logits came from (a changed prompt file
            voids the calibration of this head).
        top_k: tiles pooled per class (MI-Zero) when fitted.
        threshold: this head's val-chosen threshold (None: never reaches the target).
        metrics: in-sample and cross-fitted figures on val.
        class_embeddings: [C][D] text embeddings of the prompts (spares encoding them at load).
    """

    method: str
    params: dict[str, Any]
    classes: list[str]
    prompts_digest: str = ""
    top_k: int = 10
    threshold: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    class_embeddings: list[list[float]] | None = None

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities [..., C] of pooled or tile logits [..., C]."""
        logits = np.asarray(logits, np.float64)
        if self.method == "temperature":
            return softmax(logits / self.params["temperature"])
        if self.method == "temperature_isotonic":
            return top_label_map(softmax(logits / self.params["temperature"]),
                                 self.params["iso_x"], self.params["iso_y"])
        if self.method == "platt":
            p = sigmoid(self.params["a"] * binary_logit(logits) + self.params["b"])
            return np.stack([1.0 - p, p], axis=-1)
        raise ConfigError(f"unknown calibration method {self.method!r}")


def binary_logit(logits: np.ndarray) -> np.ndarray:
    """Log-odds of the positive class from [..., 2] logits ordered (absent, present)."""
    return logits[..., 1] - logits[..., 0]


@dataclass
class Calibration:
    """Everything `calibration.json` holds.

    Attributes:
        heads: head name -> HeadCalibration.
        min_confidence: the default report threshold (None: no head reaches the target).
        target_precision: the selective precision the thresholds were chosen for.
        encoder_weights_hash: the encoder the scores came from (another encoder voids the file).
        meta: data, split, git SHA, date, time taken.
    """

    heads: dict[str, HeadCalibration]
    min_confidence: float | None
    target_precision: float = TARGET_PRECISION
    encoder_weights_hash: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return {"format": FORMAT, **d}

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, default=_jsonable) + "\n")
        os.replace(tmp, path)
        self.path = str(path)
        return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file; a malformed one is a ConfigError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        heads = {name: HeadCalibration(**h) for name, h in data["heads"].items()}
        return Calibration(heads, data.get("min_confidence"), data.get("target_precision",
                                                                       TARGET_PRECISION),
                           data.get("encoder_weights_hash", ""), data.get("meta", {}), str(path))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read calibration ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: invalid calibration file ({exc})") from None


def global_threshold(heads: dict[str, tuple[np.ndarray, np.ndarray]],
                     target: float = TARGET_PRECISION, min_support: int = MIN_SUPPORT
                     ) -> float | None:
    """Smallest t at which every head's val predictions at or above t reach `target` selective
    accuracy (with `min_support` of them) or there are none: one threshold for the whole report.

    Args:
        heads: head name -> (confidence [N], correct [N]) on val.
    """
    cands = sorted({float(c) for conf, _ in heads.values() for c in np.asarray(conf)})
    for t in cands:
        ok = True
        for conf, corr in heads.values():
            _cov, acc, n = selective(conf, corr, t)
            if n and (n < min_support or acc < target):
                ok = False
                break
        if ok and any(selective(c, k, t)[2] for c, k in heads.values()):
            return t
    return None
