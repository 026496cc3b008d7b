"""Configs of the PathVLM stages (`align`, `instruct`); kept apart from config.py because the
model section is a full ``ModelConfig``, whose module imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from pathvlm.model.vlm import ModelConfig
from pathvlm.train.config import OptimConfig, TrainConfig


@dataclass
class VlmDataConfig:
    """Data of the `align` (pairs JSONL) and `instruct` (conversations JSONL) stages."""

    train: str = ""
    val: str = ""  # same format; "" = hold out val_fraction of train (grouped by specimen / input)
    val_fraction: float = 0.0
    max_length: int = 512  # tokens per sample, slide tokens included; longer samples are cut at the end
    max_patches: int = 1024  # random patch subset per sample per step (train only)
    max_val: int = 200  # val samples scored for loss; 0 = all
    max_closed: int = 50  # closed (yes/no, multiple-choice) val questions answered by generation; 0 = none
    prompts: list[str] = field(default_factory=lambda: [  # align: user turns, cycled over samples
        "<slide>\nDescribe this image.", "<slide>\nWrite a caption for this H&E field.",
        "<slide>\nDescribe the morphology you see."])


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class AlignStageConfig:
    """LLaVA stage 1: encoder and LLM frozen; aggregator + projector learn to caption."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: VlmDataConfig = field(default_factory=VlmDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: str = ""  # a pathvlm run dir / registered name to start from; its own config replaces `model`


@dataclass
class InstructStageConfig:
    """LoRA on the LLM + projector (+ aggregator) on instruction conversations."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: VlmDataConfig = field(default_factory=VlmDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: str = ""  # usually an `align` run; "" = fresh aggregator/projector from `model`
    lora: LoraConfig = field(default_factory=LoraConfig)
    train_aggregator: bool = False
    train_projector: bool = True
    qlora: bool = False  # load the LLM in 4 bit through bitsandbytes (CUDA, or CPU with bitsandbytes >= 0.50)
