"""`align` stage (LLaVA stage 1): encoder and LLM frozen; aggregator + projector learn to caption.

Reads image-text pairs (``image`` or ``features`` + ``text``); each pair becomes a one-turn chat
``<slide> + prompt -> caption`` (prompts cycled from ``data.prompts``). The run directory is a
PathVLM model directory (`pathvlm.load_model(run)`); the stage config is kept as train_config.yaml.
"""

from __future__ import annotations

from typing import Any

from pathvlm.data.formats import SLIDE_TOKEN, read_pairs
from pathvlm.errors import ConfigError
from pathvlm.train.vlm_config import AlignStageConfig
from pathvlm.train.vlm_task import VlmTask, split_records, start_model


def freeze_all_but(vlm: Any, parts: tuple[str, ...]) -> None:
    for p in vlm.parameters():
        p.requires_grad_(False)
    for part in parts:
        for p in getattr(vlm, part).parameters():
            p.requires_grad_(True)


class AlignTask(VlmTask):
    def __init__(self, cfg: AlignStageConfig):
        prompts = cfg.data.prompts
        if not prompts or any(p.count(SLIDE_TOKEN) != 1 for p in prompts):
            raise ConfigError(f"data.prompts: give at least one prompt, each with {SLIDE_TOKEN} exactly once")
        train, val = split_records(cfg, read_pairs, "image-text pairs")
        vlm = start_model(cfg)
        freeze_all_but(vlm, ("aggregator", "projector"))
        super().__init__(cfg, vlm, train, val)

    def messages_of(self, rec: dict[str, Any], index: int) -> list[dict[str, str]]:
        prompts = self.cfg.data.prompts
        return [{"role": "user", "content": prompts[index % len(prompts)]},
                {"role": "assistant", "content": rec["text"]}]
