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

# (field spec, question, allowed options) -> raw answer: a value, or (value, confidence)
Chooser = Callable[[FieldSpec, str, list[str]], Any]

CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


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
    """

    slide: str
    stain: str = "H&E"
    role: str | None = None
    tissue_fractions: dict[str, float] = field(default_factory=dict)
    entity_probs: dict[str, float] = field(default_factory=dict)
    top_tiles: list[tuple[int, int]] = field(default_factory=list)
    class_tiles: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    heatmap: str | None = None

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
    """

    slides: list[SlideFindings] = field(default_factory=list)
    proposals: dict[str, Any] = field(default_factory=dict)
    choose: Chooser | None = None
    model: str = "none"
    weights_hash: str | None = None
