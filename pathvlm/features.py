"""Feature files: one `<slide stem>.h5` per slide with `features` [N, D] and `coords` [N, 2].

Files are written under a temporary name and renamed, so a killed run never leaves a partial
`.h5`; `is_complete` decides whether an existing file can be reused (resume).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pathvlm.errors import PathVLMError
from pathvlm.provenance import provenance

# attributes that must match for an existing file to count as done; see ARCHITECTURE.md
RESUME_KEYS = (
    "encoder",
    "encoder_weights_hash",
    "precision",
    "mpp",
    "patch_size",
    "tile_config",
    "tissue_config",
    "slide_size",
    "slide_mtime_ns",
)


class FeatureFileError(PathVLMError):
    """A file that should hold features is missing, corrupt, or not a pathvlm feature file."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {reason}")


@dataclass
class FeatureBag:
    """Patch features of one slide or image, in memory."""

    features: torch.Tensor  # [N, D] float32
    coords: torch.Tensor  # [N, 2] int64, level-0 (x, y)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def _attr_value(value: Any) -> Any:
    """h5py-storable form of an attribute: dicts/lists as JSON text, None as empty string."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Path):
        return str(value)
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def write_features(
    path: str | Path,
    features: torch.Tensor | np.ndarray,
    coords: torch.Tensor | np.ndarray,
    attrs: dict[str, Any],
) -> Path:
    """Atomically write a feature file: ``<path>.tmp-<pid>`` first, then ``os.replace``."""
    import h5py

    path = Path(path)
    feats = np.asarray(
        features.detach().cpu() if isinstance(features, torch.Tensor) else features,
        dtype=np.float32,
    )
    xy = np.asarray(
        coords.detach().cpu() if isinstance(coords, torch.Tensor) else coords, dtype=np.int64
    )
    if feats.ndim != 2 or xy.shape != (feats.shape[0], 2):
        raise ValueError(f"features {feats.shape} and coords {xy.shape} must be [N, D] and [N, 2]")
    attrs = {**provenance(), **attrs}  # version and git commit; the caller's encoder hash stays
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats)
            f.create_dataset("coords", data=xy)
            for key, value in attrs.items():
                f.attrs[key] = _attr_value(value)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_feature_attrs(path: str | Path) -> dict[str, Any]:
    """Only the attributes of a feature file (cheap; used by the resume check)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise FeatureFileError(path, f"not a readable HDF5 feature file ({exc})") from exc


def load_features(path: str | Path) -> FeatureBag:
    """Read a feature file into a FeatureBag (features float32 [N, D], coords int64 [N, 2])."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(path, "feature file not found")
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise FeatureFileError(
                    path, "not a pathvlm feature file (needs 'features' and 'coords')"
                )
            feats = np.asarray(f["features"][()], dtype=np.float32)
            xy = np.asarray(f["coords"][()], dtype=np.int64)
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise FeatureFileError(path, f"not a readable HDF5 feature file ({exc})") from exc
    if feats.ndim != 2 or xy.ndim != 2 or xy.shape != (feats.shape[0], 2):
        raise FeatureFileError(
            path, f"inconsistent shapes: features {feats.shape}, coords {xy.shape}"
        )
    return FeatureBag(torch.from_numpy(feats), torch.from_numpy(xy), attrs, path)


def check_same_encoder(attrs: dict[str, Any], name: str | None, weights_hash: str | None,
                       where: str) -> None:
    """Features must come from the encoder that reads them: same weights (hash), else one error.

    Files that do not record their encoder (older or hand-made) pass; the width check still applies.
    """
    have_name, have_hash = attrs.get("encoder"), attrs.get("encoder_weights_hash")
    if have_hash and weights_hash and have_hash != weights_hash:
        raise FeatureFileError(where, f"features come from encoder {have_name} (weights {have_hash}), "
                               f"this model reads encoder {name} (weights {weights_hash}); "
                               f"re-embed with --encoder {name}")


def is_complete(path: str | Path, expected: dict[str, Any]) -> bool:
    """True when ``path`` is a readable feature file whose resume attributes equal ``expected``."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        attrs = read_feature_attrs(path)
    except FeatureFileError:
        return False
    for key in RESUME_KEYS:
        if key not in expected:
            continue
        want = _attr_value(expected[key])
        # files from before precision was recorded were computed in fp32
        have = attrs.get(key, "fp32" if key == "precision" else None)
        if isinstance(want, float) or isinstance(have, float):
            try:
                if abs(float(want) - float(have)) > 1e-9:
                    return False
            except (TypeError, ValueError):
                return False
        elif _plain(np.asarray(want).tolist() if isinstance(want, np.ndarray) else want) != have:
            return False
    return True
