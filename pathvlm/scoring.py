"""Calibrated scores of the image-decided findings; reports and chat both read them from here.

A head is one labelled question the image answers (lymphoma entity, colorectal tissue class,
carcinoma present, tumour in a lymph node). Per slide or image the encoder's text tower scores
every tile against the head's prompts (zero-shot); the tile logits are pooled to the slide (MI-Zero
top-k mean) and the model's calibration (`calibration.json` beside its weights, fitted on the val
split by `pathvlm calibrate`) turns them into probabilities. Without a valid calibration the raw
softmax is returned and `calibrated` is False: callers must then not present it as a finding.

    from pathvlm.scoring import score, differential
    slides = score(model, "image.png")            # one SlideScores per slide of the input
    differential(slides)                          # [(WHO entity, probability), ...] best first
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathvlm.calibration import Calibration, HeadCalibration, softmax
from pathvlm.embed import encoder_views
from pathvlm.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 10
ABSENT, PRESENT = "absent", "present"


@dataclass(frozen=True)
class HeadSpec:
    """One image-decided question.

    Attributes:
        name: key in `calibration.json` and in `SlideScores.heads`.
        prompts: packaged prompt set (pathvlm/configs/prompts, `pathvlm list prompts`).
        positive: for a binary head, the prompt class meaning "present" (the others: absent).
        pool: "topk" (MI-Zero mean of the k highest tile logits per class) or "mean" (mean of
            the tile probabilities: an expected tissue composition).
        description: what it decides, in words.
    """

    name: str
    prompts: str
    positive: str | None = None
    pool: str = "topk"
    description: str = ""

    @property
    def binary(self) -> bool:
        return self.positive is not None


HEADS: dict[str, HeadSpec] = {h.name: h for h in (
    HeadSpec("lymphoma_entity", "lymphoma.json",
             description="lymphoma entity (morphologic differential)"),
    HeadSpec("crc_tissue", "crc_tissue.json", pool="mean",
             description="colorectal tissue class of each tile (tissue composition)"),
    HeadSpec("crc_tumor", "crc_tissue.json", positive="TUM",
             description="colorectal carcinoma present"),
    HeadSpec("node_tumor", "crc_tissue.json", positive="TUM",
             description="tumour (metastatic carcinoma) present in a lymph node"),
)}


def list_heads() -> list[str]:
    return list(HEADS)


@dataclass
class HeadScores:
    """One head on one slide.

    Attributes:
        head: head name.
        classes: class keys in order (binary heads: ("absent", "present")).
        logits: [C] pooled raw logits (what calibration is fitted on).
        probs: [C] probabilities: calibrated when `calibrated`, else the raw softmax.
        tile_probs: [N, C] per-tile probabilities on the same scale (evidence for each value).
        calibrated: whether `probs` come from a valid calibration.
    """

    head: str
    classes: list[str]
    logits: np.ndarray
    probs: np.ndarray
    tile_probs: np.ndarray
    calibrated: bool

    def top(self) -> tuple[str, float]:
        i = int(np.argmax(self.probs))
        return self.classes[i], float(self.probs[i])

    def ranked(self) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs, kind="stable")
        return [(self.classes[i], float(self.probs[i])) for i in order]

    def top_tiles(self, cls: str, coords: np.ndarray, n: int = 4,
                  exclude: set[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
        """Level-0 (x, y) of the `n` tiles that most support class `cls`, skipping `exclude`."""
        if not len(self.tile_probs):
            return []
        scores = self.tile_probs[:, self.classes.index(cls)]
        out = []
        for i in np.argsort(-scores, kind="stable"):
            xy = (int(coords[i][0]), int(coords[i][1]))
            if exclude and xy in exclude:
                continue
            out.append(xy)
            if len(out) == n:
                break
        return out


@dataclass
class SlideScores:
    """Every head on one slide or image of the input."""

    name: str
    stain: str | None
    source: str
    coords: np.ndarray  # [N, 2] level-0 (x, y)
    heads: dict[str, HeadScores] = field(default_factory=dict)

    @property
    def is_he(self) -> bool:
        return (self.stain or "H&E").strip().upper() in ("H&E", "HE")


class Scorer:
    """Zero-shot heads of one model plus its calibration; build once, score many inputs.

    Args:
        model: a PathVLM (or anything with `.encoder` with a text tower).
        calibration: a Calibration; "auto" reads `model.calibration` (set by `load_model` from
            `calibration.json`); None scores uncalibrated.
        heads: head names to compute (default: all).
    """

    def __init__(self, model: Any, calibration: Calibration | str | None = "auto",
                 heads: list[str] | None = None):
        from pathvlm.resources import resource_file
        from pathvlm.zeroshot import ZeroShotClassifier, load_prompts, seed_prompt_embeddings

        self.model = model
        self.heads = [HEADS[h] for h in (heads or list(HEADS))]
        self.problem: str | None = None  # why scores are uncalibrated, in words
        self.unavailable: str | None = None  # why there are no scores at all
        cal = getattr(model, "calibration", None) if calibration == "auto" else calibration
        self.source_calibration = cal
        encoder = getattr(model, "encoder", None)
        if encoder is None or not getattr(encoder, "has_text", False):
            what = "no patch encoder" if encoder is None else f"encoder {encoder.name} has no text tower"
            self.unavailable = f"{what}: no zero-shot scores of the image"
            self.calibration, self.classifiers = None, {}
            return
        if cal is None:
            self.problem = "no calibration file: scores are uncalibrated (run `pathvlm calibrate`)"
        elif cal.encoder_weights_hash and cal.encoder_weights_hash != encoder.weights_hash:
            self.problem = (f"calibration {cal.path or ''} was fitted for encoder weights "
                            f"{cal.encoder_weights_hash}, this model has {encoder.weights_hash}: "
                            "ignored (re-run `pathvlm calibrate`)")
            cal = None
        elif (fitted := cal.meta.get("encoder_test_views", 1)) != (views := encoder_views(encoder)):
            self.problem = (f"calibration {cal.path or ''} was fitted with {fitted} test view(s) of each "
                            f"tile, this encoder uses {views}: ignored (re-run `pathvlm calibrate`)")
            cal = None
        if self.problem:
            log.warning("%s", self.problem)
        self.calibration = cal
        self.classifiers: dict[str, Any] = {}
        for head in self.heads:
            if head.prompts in self.classifiers:
                continue
            prompt_set = load_prompts(resource_file("prompts", head.prompts))
            stored = self._head_cal(head.name, prompt_set.digest())
            if stored is not None and stored.class_embeddings:
                seed_prompt_embeddings(encoder, prompt_set, stored.class_embeddings)
            self.classifiers[head.prompts] = ZeroShotClassifier(model, prompts=prompt_set,
                                                                progress=False)

    def _head_cal(self, name: str, digest: str) -> HeadCalibration | None:
        cal = self.calibration.heads.get(name) if self.calibration else None
        if cal is not None and cal.prompts_digest and cal.prompts_digest != digest:
            log.warning("calibration of head %s was fitted on other prompts: ignored", name)
            return None
        return cal

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def status(self) -> dict[str, Any]:
        """What a report says about the calibration in force."""
        cal = self.calibration
        return {"calibrated": cal is not None, "file": cal.path if cal else None,
                "target_precision": cal.target_precision if cal else None,
                "min_confidence": cal.min_confidence if cal else None,
                "problem": self.unavailable or self.problem}

    def class_embeddings(self, head: str) -> np.ndarray:
        return self.classifiers[HEADS[head].prompts].class_embeddings.numpy()

    def prompts_digest(self, head: str) -> str:
        return self.classifiers[HEADS[head].prompts].prompt_set.digest()

    def score_slides(self, slides: list[Any]) -> list[SlideScores]:
        """Scores of resolved inputs (`pathvlm.model.inputs.SlideInput`: features + names)."""
        out = []
        for i, s in enumerate(slides):
            coords = np.asarray(s.bag.coords)
            scores = SlideScores(s.name or f"input{i + 1}", s.stain, s.source, coords)
            if self.unavailable or s.bag.features.shape[0] == 0:
                out.append(scores)
                continue
            logits: dict[str, np.ndarray] = {}
            try:
                for key, clf in self.classifiers.items():
                    logits[key] = clf.logits_from_embeddings(s.bag.features)  # [N, C]
            except ModelError as exc:  # features from another encoder
                log.warning("%s: zero-shot skipped (%s)", s.source, exc)
                out.append(scores)
                continue
            for head in self.heads:
                clf = self.classifiers[head.prompts]
                scores.heads[head.name] = self._head(head, clf.classes, logits[head.prompts])
            out.append(scores)
        return out

    def _head(self, head: HeadSpec, names: list[str], tile_logits: np.ndarray) -> HeadScores:
        from pathvlm.zeroshot import topk_pool

        cal = self._head_cal(head.name, self.classifiers[head.prompts].prompt_set.digest())
        k = cal.top_k if cal is not None else DEFAULT_TOP_K
        if head.binary:
            pos = names.index(head.positive)
            rest = np.delete(tile_logits, pos, axis=1)
            neg = rest.max(1) + np.log(np.exp(rest - rest.max(1, keepdims=True)).sum(1))
            tile = np.stack([neg, tile_logits[:, pos]], axis=1)  # [N, 2] (absent, present)
            z = topk_pool((tile[:, 1] - tile[:, 0])[:, None], k)[0]
            classes, pooled = [ABSENT, PRESENT], np.array([0.0, z])
        else:
            classes, tile, pooled = list(names), tile_logits, topk_pool(tile_logits, k)
        if cal is not None:
            tile_probs, probs = cal.probs(tile), cal.probs(pooled)
        else:
            tile_probs, probs = softmax(tile), softmax(pooled)
        if head.pool == "mean":
            probs = tile_probs.mean(axis=0)
        return HeadScores(head.name, classes, pooled, probs, tile_probs, cal is not None)


_SCORERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_scorer(model: Any) -> Scorer:
    """The model's Scorer with its own calibration, built once per model object."""
    cal = getattr(model, "calibration", None)
    scorer = _SCORERS.get(model)
    if scorer is None or scorer.source_calibration is not cal:
        scorer = Scorer(model)
        _SCORERS[model] = scorer
    return scorer


def score(model: Any, input: Any, scorer: Scorer | None = None,
          mpp: float | None = None) -> list[SlideScores]:
    """Calibrated head scores for every slide of a slide / image / feature file / case / list.

    Args:
        model: a PathVLM.
        input: anything `PathVLM.ask` accepts, or already resolved `SlideInput`s.
        scorer: a Scorer to use (default: the model's own, see `get_scorer`).
        mpp: a plain image's own um/px (see `resolve_inputs`).
    """
    from pathvlm.model.inputs import resolve_inputs
    from pathvlm.slide import TileConfig

    tile = TileConfig(mpp=model.cfg.tile_mpp, size=model.cfg.tile_size)
    slides = resolve_inputs(input, model.encoder, model.transform, tile, mpp)
    return (scorer or get_scorer(model)).score_slides(slides)


def differential(slides: list[SlideScores], he_only: bool = True) -> list[tuple[str, float]]:
    """The morphologic differential: lymphoma entities (WHO-HAEM5 names) with their
    probabilities averaged over the (H&E) slides, best first; [] without entity scores."""
    from pathvlm.reports.tables import ENTITY_ALIASES

    rows = [s.heads["lymphoma_entity"] for s in slides
            if "lymphoma_entity" in s.heads and (s.is_he or not he_only)]
    if not rows:
        return []
    probs = np.mean([r.probs for r in rows], axis=0)
    names = [ENTITY_ALIASES.get(c, c) for c in rows[0].classes]
    order = np.argsort(-probs, kind="stable")
    return [(names[i], float(probs[i])) for i in order]
