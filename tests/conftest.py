"""Shared fixtures: where the real data lives, and skips with a reason when it does not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# tests never reach a model hub: fail fast instead of waiting on a closed network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$PATHVLM_DATA`` or ``../shared/data`` beside the checkout, if it exists."""
    env = os.environ.get("PATHVLM_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if root is None:
        pytest.skip("real data not found: set PATHVLM_DATA or place it in ../shared/data")
    return root


@pytest.fixture(scope="session")
def wsi_dir(shared_data: Path) -> Path:
    path = shared_data / "wsi"
    if not path.is_dir():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def ihc_png() -> Path:
    """scikit-image's bundled colon tissue image (exists on every machine with the project)."""
    import skimage

    path = Path(skimage.__file__).parent / "data" / "ihc.png"
    if not path.exists():
        pytest.skip(f"{path} missing from this scikit-image install")
    return path
