"""Train-time augmentation for H&E patches, driven by an explicit per-sample generator.

Stain jitter perturbs the haematoxylin/eosin/DAB optical densities (Tellez et al. 2018 style),
which mimics lab-to-lab staining differences better than RGB colour jitter. With a Reinhard
template (`LabReference`) each crop is first moved to a template drawn around it (RandStainNA),
and a share of crops can be shown as luminance only, so colour alone cannot name a specimen.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pathvlm.stain import LabReference, hed_jitter, reinhard
from pathvlm.train.config import AugmentConfig

RESAMPLE_FILTERS = (Image.Resampling.BOX, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
                    Image.Resampling.LANCZOS)


class TrainTransform:
    """PIL image -> normalised [3, size, size] tensor with crop, flips, 90° turns and stain jitter."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...], cfg: AugmentConfig,
                 lab: LabReference | None = None, tile: int | None = None):
        # native crops take ``tile`` source pixels (the encoder's tile size; default the input
        # size) and resize them to the ``size`` px input, as inference resizes its tiles
        self.size, self.cfg, self.lab = size, cfg, lab
        self.tile = tile or size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def _crop(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        w, h = image.size
        if self.cfg.crop == "native":  # tile scale: size source pixels, jittered
            side = self.tile * rng.uniform(self.cfg.native_min, self.cfg.native_max)
        else:  # a share of the whole field
            side = np.sqrt(rng.uniform(self.cfg.scale_min, 1.0) * w * h)
        side = max(1, round(min(w, h, side)))  # square crops: tiles have no preferred aspect
        x = int(rng.integers(0, w - side + 1))
        y = int(rng.integers(0, h - side + 1))
        box = (x, y, x + side, y + side)
        if self.cfg.resample > 0 and rng.random() < self.cfg.resample:
            # a detour through a lower resolution, as a resampled or thumbnailed image has taken
            low = max(8, round(side * rng.uniform(self.cfg.resample_min, 1.0)))
            image = image.resize((low, low), RESAMPLE_FILTERS[int(rng.integers(len(RESAMPLE_FILTERS)))], box=box)
            box = None
        return image.resize((self.size, self.size), Image.BICUBIC, box=box)

    def __call__(self, image: Image.Image, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        arr = np.asarray(self._crop(image.convert("RGB"), rng), dtype=np.float32) / 255.0  # [H, W, 3]
        if self.lab is not None:  # as inference normalises each tile, or to a random template
            target = self.lab.sample(rng, self.cfg.randstain) if self.cfg.randstain > 0 else self.lab.mean
            arr = reinhard(arr, target).astype(np.float32)
        if self.cfg.flip:
            if rng.random() < 0.5:
                arr = arr[:, ::-1]
            if rng.random() < 0.5:
                arr = arr[::-1]
        if self.cfg.rot90:
            arr = np.rot90(arr, k=int(rng.integers(0, 4)))
        if self.cfg.stain_jitter > 0 or self.cfg.stain_bias > 0:
            arr = hed_jitter(arr, rng, self.cfg.stain_jitter, self.cfg.stain_bias)
        if self.cfg.grayscale > 0 and rng.random() < self.cfg.grayscale:
            arr = np.repeat(arr @ np.array([0.299, 0.587, 0.114], dtype=arr.dtype), 3).reshape(arr.shape)
        if self.cfg.brightness > 0:
            arr = np.clip(arr * rng.uniform(1 - self.cfg.brightness, 1 + self.cfg.brightness), 0.0, 1.0)
        tensor = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)  # [3, H, W]
        return (tensor - self.mean) / self.std
