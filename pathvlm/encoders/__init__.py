"""Patch encoder registry on open_clip: `create_encoder(name) -> (PatchEncoder, transform)`.

Importing it registers the project's encoders and the field's foundation encoders (foundation.py).
"""

from pathvlm.encoders import foundation as _foundation  # noqa: F401  (registers its entries)
from pathvlm.encoders.foundation import FOUNDATION_PREFIX, FoundationSpec, get_foundation_spec
from pathvlm.encoders.foundation_load import _build_from_registry, load_foundation
from pathvlm.encoders.foundation_models import FoundationEncoder, build_foundation
from pathvlm.encoders.patch_encoder import PatchEncoder
from pathvlm.encoders.registry import (
    EncoderEntry,
    build_transform,
    create_encoder,
    get_encoder_entry,
    input_size,
    list_encoders,
    native_tile_size,
    register_spec_builder,
)

register_spec_builder(FOUNDATION_PREFIX, _build_from_registry)

__all__ = [
    "EncoderEntry",
    "FoundationEncoder",
    "FoundationSpec",
    "PatchEncoder",
    "build_foundation",
    "build_transform",
    "create_encoder",
    "get_encoder_entry",
    "get_foundation_spec",
    "input_size",
    "list_encoders",
    "load_foundation",
    "native_tile_size",
]
