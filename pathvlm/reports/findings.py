"""The typed interface through which image-derived evidence reaches report drafting.

The model side fills `ImageFindings` (tile-class fractions, zero-shot entity probabilities,
attention top tiles, heatmap references, and optionally an LLM that picks among allowed values);
drafting never sees pixels or the model itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pathvlm.reports.fields import FieldSpec

# (field spec, question, allowed options) -> raw answer: a value, (value, confidence) or a
# Proposal. A bare confidence is taken as a calibrated probability: the model side vouches for
# it; scores it cannot vouch for come as Proposal(calibrated=False) and never fill a field.
Chooser = Callable[[FieldSpec, str, list[str]], Any]


@dataclass
class Proposal:
    """A value the model side proposes for one field, and what drafting needs to judge it.

    Attributes:
        value: the best value.
        confidence: its probability (calibrated when `calibrated`); None when none applies.
        considered: (value, probability) of the values weighed, best first.
        evidence: per-slide evidence dicts (slide, tiles, heatmap) supporting `value`.
        note: shown with the field.
        calibrated: False for scores no labelled data has calibrated (an LLM's ranking).
    """

    value: Any
    confidence: float | None = None
    considered: list[tuple[Any, float]] = field(default_factory=list)
    evidence: list[dict] = field(default_factory=list)
    note: str | None = None
    calibrated: bool = True

CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
CRC_LABELS = {"ADI": "adipose tissue", "BACK": "background", "DEB": "debris/necrosis",
              "LYM": "lymphocytes", "MUC": "mucus", "MUS": "smooth muscle",
              "NORM": "normal colon mucosa", "STR": "cancer-associated stroma",
              "TUM": "adenocarcinoma epithelium"}


@dataclass
class SlideFindings:
    """What the image model found on one slide.

    Attributes:
        slide: slide name (file stem), as in evidence.
        stain: "H&E", "IHC:<marker>" or "special:<stain>"; only H&E feeds image-derived fields.
        role: "tumor", "lymph_node", "margin", ... or None (unlabelled).
        tissue_fractions: NCT-CRC class (ADI..TUM) -> share of tissue tiles.
        entity_probs: lymphoma entity (WHO name or alias such as "CLL") -> probability.
        top_tiles: level-0 (x, y) of the most attended tiles.
        class_tiles: class or entity -> level-0 (x, y) of its most typical tiles.
        heatmap: reference (path or URI) of the attention heatmap.
        heads: calibrated probabilities by head (`pathvlm.scoring`): head -> class -> p.
            Empty for hand-built findings, which drafting then reads from the fractions above.
        head_tiles: head -> class -> level-0 (x, y) of the tiles that most support that class.
        tile_top: per tile, (tissue class, calibrated probability) of its top colorectal class.
    """

    slide: str
    stain: str = "H&E"
    role: str | None = None
    tissue_fractions: dict[str, float] = field(default_factory=dict)
    entity_probs: dict[str, float] = field(default_factory=dict)
    top_tiles: list[tuple[int, int]] = field(default_factory=list)
    class_tiles: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    heatmap: str | None = None
    heads: dict[str, dict[str, float]] = field(default_factory=dict)
    head_tiles: dict[str, dict[str, list[tuple[int, int]]]] = field(default_factory=dict)
    tile_top: list[tuple[str, float]] = field(default_factory=list)

    @property
    def is_he(self) -> bool:
        return self.stain.strip().upper() in ("H&E", "HE")


@dataclass
class ImageFindings:
    """Everything image-derived that drafting may use.

    Attributes:
        slides: per-slide findings.
        proposals: raw per-field answers the model already gave (any field name; drafting
            validates them and ignores those for fields the image may not fill).
        choose: optional LLM call that picks among a field's allowed values.
        model: model name recorded in the report.
        weights_hash: the model's weights hash, recorded in the report's provenance.
        min_confidence: the threshold in force: a proposed value fills its field only when its
            probability is at least this (None: nothing is filled from the image).
        calibration: what the report says about the calibration behind the scores.
    """

    slides: list[SlideFindings] = field(default_factory=list)
    proposals: dict[str, Any] = field(default_factory=dict)
    choose: Chooser | None = None
    model: str = "none"
    weights_hash: str | None = None
    min_confidence: float | None = 0.0
    calibration: dict[str, Any] | None = None
