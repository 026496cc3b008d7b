"""Hand-built image findings shared by the report tests (the model side fills these for real)."""

from __future__ import annotations

from datetime import datetime, timezone

from pathvlm.reports import ImageFindings, SlideFindings

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def tumour_slide(name: str = "tumour-A1", role: str | None = "tumor", tum: float = 0.4,
                 muc: float = 0.1) -> SlideFindings:
    rest = max(0.0, 1.0 - tum - muc)
    return SlideFindings(
        name, role=role,
        tissue_fractions={"TUM": tum, "MUC": muc, "STR": rest * 0.6, "ADI": rest * 0.4},
        entity_probs={"CLL": 0.5, "FL": 0.3, "MCL": 0.2},
        top_tiles=[(0, 0), (448, 224)], class_tiles={"TUM": [(224, 224)], "MUC": [(672, 0)]},
        heatmap=f"heatmaps/{name}.png")


def first_option(spec, question, options):
    """A well-behaved chooser: the first allowed value, or 3 for numbers."""
    return (options[0], 0.7) if options else 3


def findings(chooser=first_option, **proposals) -> ImageFindings:
    return ImageFindings([tumour_slide()], proposals=proposals, choose=chooser, model="test-model")
