"""Embeddings kept on disk between runs, keyed by everything they depend on.

The key holds the encoder's weights hash, precision, tile size and scale and test views, plus each
input file's path, size and mtime. A changed file or other weights therefore miss the cache.
Encoders without a recorded weights hash, and random-weight ones, are never cached.
``PATHVLM_EMBED_CACHE=0`` turns the cache off. Each file is written whole under a name of its own
and then renamed, so a reader never sees a partial one; an unreadable file counts as a miss.
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
    """The cached array, or None when there is none or it cannot be read (then it is recomputed)."""
    if path is None or not path.is_file():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def save_array(path: Path | None, array: np.ndarray) -> None:
    """Written under a name of this writer's own, then renamed: processes embedding the same
    inputs at once (the ranks of a multi-GPU run) never write into one file."""
    import tempfile

    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp.npy")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
