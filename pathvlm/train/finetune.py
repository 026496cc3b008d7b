"""LoRA fine-tuning of a trained PathVLM on a user's instruction JSONL, scored before and after.

`finetune_lora(cfg)` is the `instruct` stage started from ``cfg.init`` plus an evaluation of the
held-out split before training and of the saved run after it (assistant-token loss and accuracy
on closed yes/no and multiple-choice questions), and optionally a merged copy of the model.
`scripts/finetune_lora.py` is its command line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pathvlm.errors import ConfigError

log = logging.getLogger(__name__)


def merge_adapter(run: Path, out: Path) -> Path:
    """Write a copy of ``run`` with its LoRA adapter merged into the LLM (saved under ``llm/``)."""
    from pathvlm.model import load_model

    vlm = load_model(run, merge_lora=False, device="cpu")  # saved from the CPU
    if not hasattr(vlm.llm, "merge_and_unload"):
        raise ConfigError(f"{run}: has no LoRA adapter to merge")
    vlm.llm = vlm.llm.merge_and_unload()
    vlm.save_pretrained(out)
    if not (out / "llm").is_dir():  # save_pretrained writes an LLM only when it is from scratch
        vlm.llm.save_pretrained(str(out / "llm"))
        vlm.tokenizer.save_pretrained(str(out / "llm"))
    return out


def finetune_lora(cfg: Any, merge: bool = False) -> dict[str, Any]:
    """Fine-tune ``cfg.init`` with LoRA under the `instruct` stage config ``cfg``.

    Returns:
        ``{"run": dir, "before": {...}, "after": {...}, ["merged": dir, "after_merged": {...}]}``,
        also written to ``<run>/finetune_report.json``. "before" is the starting model (a fresh
        LoRA adapter starts at zero, so it is the model as given).
    """
    from accelerate.utils import set_seed

    from pathvlm.model import load_model
    from pathvlm.train.instruct_task import InstructTask
    from pathvlm.train.loop import run_training
    from pathvlm.train.vlm_task import evaluate_vlm

    if not cfg.init:
        raise ConfigError("fine-tuning needs a trained model to start from (--model / init)")
    if not cfg.data.val and cfg.data.val_fraction <= 0:
        raise ConfigError("fine-tuning evaluates on a held-out split: give data.val or data.val_fraction > 0")
    set_seed(cfg.train.seed)
    task = InstructTask(cfg)

    def score(vlm: Any) -> dict[str, float]:
        vlm.eval()
        return evaluate_vlm(vlm, task.val_samples, task.feats, task.closed, task.k)

    before = score(task.vlm)
    log.info("before: %s", before)
    task.vlm.train()
    run = run_training(cfg, lambda: task)
    report: dict[str, Any] = {"run": str(run), "model": cfg.init, "before": before,
                              # the saved run, as users will load it, on the device "before" ran on
                              "after": score(load_model(run, device=task.vlm.device)),
                              "n_train": len(task.train_set), "n_val": len(task.val_samples),
                              "n_closed": len(task.closed)}
    if merge:
        merged = merge_adapter(run, Path(run) / "merged")
        report.update(merged=str(merged), after_merged=score(load_model(merged, device=task.vlm.device)))
    (Path(run) / "finetune_report.json").write_text(json.dumps(report, indent=2))
    return report
