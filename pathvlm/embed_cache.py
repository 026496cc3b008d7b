"""Embeddings kept on disk between runs, keyed by everything they depend on.

The key holds the encoder's weights hash, precision, tile size and scale and test views, plus each
input file's path, size and mtime. A changed file or other weights therefore miss the cache.
Encoders without a recorded weights hash, and random-weight ones, are never cached.
``PATHVLM_EMBED_CACHE=0`` turns the cache off. Files are written whole under a temporary name, so
there is never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def encoder_key(encoder: Any) -> list | None:
    """What an embedding depends on besides its inputs, or None when the encoder cannot be cached."""
    from pathvlm.embed import encoder_views
    from pathvlm.encoders import native_tile_size

    weights = getattr(encoder, "weights_hash", None)
    if os.environ.get("PATHVLM_EMBED_CACHE", "1") == "0" or not weights or getattr(
            encoder, "random_weights", False):
        return None
    return [weights, getattr(encoder, "precision", "fp32"), native_tile_size(encoder),
            getattr(encoder, "tile_mpp", None), encoder_views(encoder)]


def file_stamp(item: Any) -> list | None:
    """[resolved path, size, mtime] of a file, or None for anything that is not one."""
    if not isinstance(item, (str, Path)) or not Path(item).is_file():
        return None
    st = Path(item).stat()
    return [str(Path(item).resolve()), st.st_size, st.st_mtime_ns]


def cache_path(kind: str, key: list) -> Path:
    from pathvlm.model.llm import cache_root

    return cache_root() / kind / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}.npy"


def load_array(path: Path | None) -> np.ndarray | None:
    return np.load(path, allow_pickle=False) if path is not None and path.is_file() else None


def save_array(path: Path | None, array: np.ndarray) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)
