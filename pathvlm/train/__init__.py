"""Training stages on one shared accelerate loop: `train_stage(stage, config_path, overrides)`.

Adding a stage: a `*StageConfig` dataclass with `train: TrainConfig` and `optim: OptimConfig`
sections plus its own, a class satisfying `loop.Task`, one `_STAGES` entry and a
`pathvlm/configs/train/<stage>_*.yaml`; the CLI, checkpoints and run directory come free.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pathvlm.config import load_config
from pathvlm.errors import ConfigError
from pathvlm.resources import resolve_resource
from pathvlm.train.config import (
    AugmentConfig,
    ClipStageConfig,
    MilStageConfig,
    OptimConfig,
    TrainConfig,
)

# stage name -> (config class or "module:Class", "module:TaskClass"); strings are imported on use,
# so listing stages (the CLI's choices) does not import torch
_STAGES = {
    "clip": (ClipStageConfig, "pathvlm.train.clip_task:ClipTask"),
    "mil": (MilStageConfig, "pathvlm.train.mil_task:MilTask"),
    "align": ("pathvlm.train.vlm_config:AlignStageConfig", "pathvlm.train.align_task:AlignTask"),
    "instruct": ("pathvlm.train.vlm_config:InstructStageConfig", "pathvlm.train.instruct_task:InstructTask"),
}


def _resolve(ref):
    import importlib

    if not isinstance(ref, str):
        return ref
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def list_stages() -> list[str]:
    return list(_STAGES)


def load_stage_config(stage: str, path: str | Path | None = None, overrides: Iterable[str] = ()):
    """Stage defaults -> YAML (a file or a packaged name, ``pathvlm list configs``) -> overrides."""
    if stage not in _STAGES:
        raise ConfigError(f"unknown training stage {stage!r} (choose from {', '.join(_STAGES)})")
    if path is not None:
        path = resolve_resource("configs", path)
    return load_config(_resolve(_STAGES[stage][0]), path, overrides)


def train_stage(stage: str, config_path: str | Path | None = None, overrides: Iterable[str] = ()) -> Path:
    """Resolve the stage config (defaults -> YAML -> overrides), train, return the run directory."""
    from pathvlm.train.loop import run_training

    cfg = load_stage_config(stage, config_path, overrides)
    task_cls = _resolve(_STAGES[stage][1])
    return run_training(cfg, lambda: task_cls(cfg))


__all__ = [
    "AugmentConfig", "ClipStageConfig", "MilStageConfig", "OptimConfig", "TrainConfig",
    "list_stages", "load_stage_config", "train_stage",
]
