"""Training configs: one shared `TrainConfig`/`OptimConfig` plus one section set per stage.

A stage config file (configs/train/*.yaml) layers onto these defaults; unknown keys are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    """The loop: how long, how big, how often to evaluate and checkpoint, where to write."""

    out_dir: str = "runs/train"
    seed: int = 0
    steps: int = 1000  # optimiser steps (each = grad_accum micro-batches)
    batch_size: int = 32  # per device, per micro-batch
    grad_accum: int = 1
    # auto: bf16 on a CPU with native bf16 or a bf16 GPU, fp16 on other GPUs, else no (= fp32)
    mixed_precision: Literal["auto", "no", "fp32", "bf16", "fp16"] = "auto"
    eval_every: int = 100  # 0 = only at the end
    save_every: int = 100  # checkpoint interval; 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 0
    group_by_length: bool = False  # batches of similar-length samples (align, instruct): less padding
    resume: bool = True  # continue from the newest checkpoint in out_dir when there is one
    cpu: bool = False  # force CPU even when CUDA is present


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.05  # not applied to biases, norms, embeddings' scales
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # 0 = off


@dataclass
class AugmentConfig:
    """Train-time image augmentation for the clip stage (eval uses the encoder's own transform)."""

    # "area": a random square crop of [scale_min, 1] of the image area, resized to the input size
    # (the whole field, downscaled); "native": a square of input size x U(native_min, native_max)
    # source pixels (clipped to the image), i.e. the tile scale inference cuts images and slides
    # at, with scale jitter around it
    crop: Literal["area", "native"] = "area"
    scale_min: float = 0.6  # "area" crops
    native_min: float = 0.67  # "native" crops: side / input size
    native_max: float = 1.5
    flip: bool = True  # horizontal and vertical
    rot90: bool = True
    stain_jitter: float = 0.05  # HED-space scale jitter (+-); 0 = off
    stain_bias: float = 0.01  # HED-space shift (+-)
    brightness: float = 0.1  # +- multiplicative; 0 = off
    # RandStainNA: with model.stain_norm=reinhard, each crop is moved to a LAB template drawn
    # around the fitted one with this many times the spread seen across the train images (0: the
    # fitted template itself, i.e. plain Reinhard normalisation as at inference)
    randstain: float = 0.0
    grayscale: float = 0.0  # probability of replacing a crop by its luminance (colour-blind view)
    # probability of passing a crop through a lower resolution first: shrunk to U(resample_min, 1)
    # of its side with a random filter, then resized to the input. Inference resamples too (a
    # 0.5 um/px image is shrunk to the tile scale and enlarged to the input; JPEG or screenshot
    # thumbnails are already soft), so the embedding must not hinge on the finest pixels
    resample: float = 0.0
    resample_min: float = 0.5


@dataclass
class ClipDataConfig:
    train: str = ""  # pairs JSONL with "image"
    val: str = ""  # pairs JSONL with "image" and "label" (zero-shot eval); "" = no eval
    classes: str = ""  # class description YAML or packaged name (pathvlm list classes)


@dataclass
class ClipModelConfig:
    encoder: str = "openclip:pathvlm-vit-s-minilm"  # any create_encoder name
    lock_image: bool = False
    # with a timm image trunk and lock_image false: -1 trains the whole trunk; 0 freezes it and
    # trains only the image projection (LiT); N > 0 trains the last N of timm's layer groups.
    # Frozen groups keep their BatchNorm statistics (their norms run in eval mode)
    image_unlocked_groups: int = -1
    lock_text: bool = False
    train_text_proj: bool = False  # with lock_text: still train the text projection (text.proj / text_projection)
    # "macenko" / "reinhard": fit a stain reference on the train images, normalise every image to
    # it (Macenko: before augmentation; Reinhard: each crop, see augment.randstain) and save it with
    # the encoder, whose inference transform applies it; "": keep the encoder's reference, if any
    stain_norm: Literal["", "macenko", "reinhard"] = ""
    # "clip": open_clip's ClipLoss (each image's own caption is its only positive); "unicl":
    # every caption of the same label (or, without labels, the same text) in the batch is a
    # positive (Yang et al. 2022, UniCL): with few distinct captions per class, ClipLoss would
    # push same-class images apart
    loss: Literal["clip", "unicl"] = "clip"


@dataclass
class ClipStageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class MilDataConfig:
    labels: str = ""  # CSV slide_id,features,label[,split]
    train_split: str = "train"
    val_split: str = "val"
    max_patches: int = 4096  # random subset per slide per step (train only), bounds memory


@dataclass
class MilModelConfig:
    aggregator: str = "abmil"  # a create_aggregator name
    hidden_dim: int = 128
    n_tokens: int = 1  # slide tokens; the head reads their mean
    dropout: float = 0.1


@dataclass
class MilStageConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: MilDataConfig = field(default_factory=MilDataConfig)
    model: MilModelConfig = field(default_factory=MilModelConfig)
