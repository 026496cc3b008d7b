"""What produced an output: pathvlm version, model weights hash and git commit (when known).

One helper for every writer (run directories' meta.json, feature-file attributes, reports), so
the three always carry the same keys; a key whose value is unknown is left out, never guessed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

from pathvlm import __version__
from pathvlm.resources import checkout_root

WEIGHT_SUFFIXES = (".safetensors",)
SKIP_DIRS = ("checkpoints",)  # resumable training state, not the run's weights


@cache
def git_commit() -> str | None:
    """The commit of the checkout pathvlm runs from, with ``+dirty`` for uncommitted changes.

    None for an installed wheel (no checkout around the package) or when git is unavailable;
    a wheel installed inside some other repository never reports that repository's commit.
    """
    root = checkout_root()
    if root is None:
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5, check=False)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = head.stdout.strip()
    if head.returncode != 0 or not sha:
        return None
    return sha + ("+dirty" if status.returncode == 0 and status.stdout.strip() else "")


def hash_weight_files(folder: str | Path) -> str | None:
    """Short sha256 over a model folder's weight files (names and bytes, in sorted order).

    Covers every ``*.safetensors`` below ``folder`` (encoder/, adapter/, llm/ included, training
    checkpoints excluded); None when there is none.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()
                   and not any(part in SKIP_DIRS for part in p.relative_to(folder).parts[:-1]))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_weights_hash(model: Any) -> str | None:
    """A model's ``weights_hash`` (a loaded PathVLM's run-dir hash, or an encoder's own hash)."""
    if model is None:
        return None
    own = getattr(model, "weights_hash", None)
    if own:
        return str(own)
    encoder = getattr(model, "encoder", None)
    return str(encoder.weights_hash) if getattr(encoder, "weights_hash", None) else None


def provenance(model: Any = None, weights_hash: str | None = None) -> dict[str, str]:
    """``pathvlm_version``, ``weights_hash`` (of ``model`` or given) and ``git_commit`` if known."""
    out = {"pathvlm_version": __version__,
           "weights_hash": weights_hash or model_weights_hash(model),
           "git_commit": git_commit()}
    return {k: v for k, v in out.items() if v}


def record_run_weights(run_dir: str | Path) -> dict[str, str]:
    """Add the run's final weights hash (and current provenance) to ``run_dir/meta.json``."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    for key in ("git_sha", "git_commit", "weights_hash"):  # never keep a stale value
        meta.pop(key, None)
    meta.update(provenance(weights_hash=hash_weight_files(run_dir)))
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta
