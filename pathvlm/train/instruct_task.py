"""`instruct` stage: LoRA on the LLM (peft) + projector (+ aggregator) on instruction chats.

Loss only on assistant tokens. ``qlora: true`` loads the LLM in 4 bit through bitsandbytes
(CUDA, or CPU with bitsandbytes >= 0.50). The run directory holds aggregator/projector weights and the LoRA ``adapter/``;
`pathvlm.load_model(run)` opens it.
"""

from __future__ import annotations

import logging
from typing import Any

from pathvlm.data.formats import read_conversations
from pathvlm.errors import ConfigError, DependencyError
from pathvlm.train.vlm_config import InstructStageConfig
from pathvlm.train.vlm_task import VlmTask, split_records, start_model

log = logging.getLogger(__name__)


def check_qlora(cpu: bool) -> None:
    """bitsandbytes present, and a CUDA GPU or a version with the CPU backend (>= 0.50, tested)."""
    import importlib.metadata

    import torch

    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise DependencyError("qlora: true loads the LLM in 4 bit and needs bitsandbytes: "
                              "pip install bitsandbytes") from None
    if torch.cuda.is_available() and not cpu:
        return
    major_minor = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if major_minor < (0, 50):
        raise DependencyError(f"qlora: true without a CUDA GPU needs bitsandbytes >= 0.50 (CPU backend); "
                              f"found {version}. Use a GPU or set qlora: false")
    log.warning("qlora on CPU: 4-bit weights save memory but run slower than full precision here")


def add_lora(vlm: Any, cfg: InstructStageConfig) -> None:
    """Wrap the LLM with a fresh LoRA adapter, or make an adapter it already carries trainable."""
    from peft import LoraConfig, get_peft_model

    if hasattr(vlm.llm, "peft_config"):  # an instruct run continued: train its adapter further
        for name, p in vlm.llm.named_parameters():
            p.requires_grad_("lora_" in name)
        log.info("continuing the LoRA adapter of %s", cfg.init)
        return
    if cfg.qlora:
        from peft import prepare_model_for_kbit_training

        vlm.llm = prepare_model_for_kbit_training(vlm.llm, use_gradient_checkpointing=False)
    names = {n.rsplit(".", 1)[-1] for n, _ in vlm.llm.named_modules()}
    missing = sorted(set(cfg.lora.target_modules) - names)
    if missing:
        raise ConfigError(f"lora.target_modules: {missing} are not modules of this LLM "
                          f"(e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
    vlm.llm = get_peft_model(vlm.llm, lora)


class InstructTask(VlmTask):
    def __init__(self, cfg: InstructStageConfig):
        if cfg.qlora:
            check_qlora(cfg.train.cpu)
        train, val = split_records(cfg, read_conversations, "instruction conversations")
        vlm = start_model(cfg, "4bit" if cfg.qlora else None)
        for p in vlm.parameters():
            p.requires_grad_(False)
        add_lora(vlm, cfg)
        for part, on in (("aggregator", cfg.train_aggregator), ("projector", cfg.train_projector)):
            for p in getattr(vlm, part).parameters():
                p.requires_grad_(on)
        n_train = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
        log.info("instruct: %d trainable parameters of %d", n_train, sum(p.numel() for p in vlm.parameters()))
        super().__init__(cfg, vlm, train, val)
