"""Train-time augmentation: the resolution detour that makes embeddings robust to resampling."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pathvlm.train.augment import TrainTransform
from pathvlm.train.config import AugmentConfig

PLAIN = {"crop": "native", "native_min": 1.0, "native_max": 1.0, "flip": False, "rot90": False, "stain_jitter": 0.0,
             "stain_bias": 0.0, "brightness": 0.0}


def _detail(x: torch.Tensor) -> float:
    """Mean absolute difference of neighbouring pixels: high-frequency content."""
    return float((x[:, :, 1:] - x[:, :, :-1]).abs().mean())


def test_resample_detour_softens_some_crops_and_is_seeded():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    sharp = TrainTransform(64, (0.0,) * 3, (1.0,) * 3, AugmentConfig(**PLAIN), tile=64)
    soft = TrainTransform(64, (0.0,) * 3, (1.0,) * 3,
                          AugmentConfig(**PLAIN, resample=1.0, resample_min=0.5), tile=64)
    base = sharp(image, 0)
    # without the detour a native crop of input size is the image itself
    assert torch.allclose(base, torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1))
    outs = [soft(image, seed) for seed in range(6)]
    assert all(_detail(o) < _detail(base) for o in outs)  # every detour loses fine detail
    assert len({round(_detail(o), 4) for o in outs}) > 1  # by a random amount and filter
    assert torch.equal(soft(image, 3), outs[3])  # the same seed, the same crop
    half = TrainTransform(64, (0.0,) * 3, (1.0,) * 3, AugmentConfig(**PLAIN, resample=0.5), tile=64)
    kept = sum(torch.equal(half(image, s), sharp(image, s)) for s in range(40))
    assert 8 < kept < 32  # about half of the crops take it
