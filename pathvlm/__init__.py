"""pathvlm: an offline-capable vision-language assistant for pathology.

Importing the package only defines names; heavy modules load on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (loaded lazily so `import pathvlm` stays cheap)
_LAZY = {
    "open_slide": "pathvlm.slide",
    "Slide": "pathvlm.slide",
    "TissueConfig": "pathvlm.slide",
    "TileConfig": "pathvlm.slide",
    "detect_tissue": "pathvlm.slide",
    "tile_slide": "pathvlm.slide",
    "create_encoder": "pathvlm.encoders",
    "list_encoders": "pathvlm.encoders",
    "load_features": "pathvlm.features",
    "embed_slides": "pathvlm.embed",
    "embed_slide": "pathvlm.embed",
    "embed_image": "pathvlm.embed",
    "EmbedConfig": "pathvlm.embed",
    "load_model": "pathvlm.model",
    "PathVLM": "pathvlm.model",
    "ZeroShotClassifier": "pathvlm.zeroshot",
    "zero_shot": "pathvlm.zeroshot",
    "Case": "pathvlm.case",
    "load_case": "pathvlm.case",
}

__all__ = ["__version__"] + list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pathvlm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
