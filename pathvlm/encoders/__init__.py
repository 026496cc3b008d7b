"""Patch encoder registry on open_clip: `create_encoder(name) -> (PatchEncoder, transform)`."""

from pathvlm.encoders.patch_encoder import PatchEncoder
from pathvlm.encoders.registry import (
    EncoderEntry,
    build_transform,
    create_encoder,
    get_encoder_entry,
    input_size,
    list_encoders,
)

__all__ = [
    "EncoderEntry",
    "PatchEncoder",
    "build_transform",
    "create_encoder",
    "get_encoder_entry",
    "input_size",
    "list_encoders",
]
