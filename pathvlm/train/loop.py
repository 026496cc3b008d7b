"""The one training loop every stage shares; it reads top to bottom.

A stage supplies a `Task` (model + loss: `training_step(batch) -> {name: loss}`); the loop owns
accelerate, AdamW with cosine warm-up, gradient accumulation, evaluation, checkpoints with exact
resume, metrics.csv, loss_curve.png and the final weights. Data order and augmentation depend
only on (seed, epoch, position), so a resumed run sees the same next batch as an unbroken one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pathvlm.config import save_config
from pathvlm.errors import ConfigError, ModelError
from pathvlm.provenance import record_run_weights
from pathvlm.train.metrics import MetricsLog

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


TrainConfigLike = Any  # pathvlm.train.config.TrainConfig (kept loose for stage configs)


class Task(Protocol):
    """What a stage hands the loop. ``model`` holds every parameter; frozen ones have requires_grad off."""

    model: nn.Module

    def train_dataset(self) -> Dataset: ...  # items are fetched with (index, sample_seed) keys
    def collate(self, items: list[Any]) -> Any: ...
    def training_step(self, batch: Any) -> dict[str, torch.Tensor]: ...  # summed for backward
    def evaluate(self) -> dict[str, float]: ...
    def save_final(self, out_dir: Path) -> None: ...


class EpochSampler(Sampler):
    """A fresh permutation per epoch from (seed, epoch); yields ``(index, sample_seed)``.

    The per-sample seed drives augmentation, so no augmentation draws come from global RNG state
    that a resume would have to replay. With ``lengths`` (``train.group_by_length``) each run of
    ``batch_size * GROUP_BATCHES`` permuted samples is sorted by length and cut into batches, and
    all the epoch's batches are shuffled: a batch holds samples of similar length, so it pads
    little; batch-mates are length neighbours within one run (in instruct data, often one
    question type).
    """

    GROUP_BATCHES = 32

    def __init__(self, n: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1):
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"{len(lengths)} lengths for {n} samples")
        self.n, self.seed, self.epoch = n, seed, 0
        self.lengths, self.batch_size = lengths, batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def _order(self, gen: torch.Generator) -> list[int]:
        order = torch.randperm(self.n, generator=gen).tolist()
        if self.lengths is None:
            return order
        b, group = self.batch_size, self.batch_size * self.GROUP_BATCHES
        full = self.n - self.n % b  # a last partial batch stays last (drop_last drops it)
        batches = []
        for start in range(0, full, group):
            chunk = sorted(order[start:min(start + group, full)], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + b] for i in range(0, len(chunk), b)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return [i for batch in shuffled for i in batch] + order[full:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for pos, index in enumerate(self._order(gen)):
            yield index, (base + pos) % (2**63)


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear ramp over ``warmup`` steps, then cosine from 1 down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def resolve_mixed_precision(choice: str, cpu: bool) -> str:
    """``train.mixed_precision`` -> accelerate's ``no``/``bf16``/``fp16``.

    ``auto`` follows `pathvlm.precision` (bf16 on a CPU with native bf16 or a bf16 CUDA GPU,
    fp16 on other GPUs, else no); ``fp32`` is ``no``; fp16 needs CUDA. accelerate keeps fp32
    master weights and optimizer state and autocasts forward passes (on CPU too).
    """
    from pathvlm.precision import accelerate_mixed_precision

    return accelerate_mixed_precision(choice, cpu)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # decay matrices only: biases, norm weights, scalars (logit_scale) and embeddings' 1-d params stay free
    decay, free = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else free).append(p)
    if not decay and not free:
        raise ModelError("nothing to train: every parameter is frozen")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]


# --- checkpoints: safetensors for tensors, weights-only torch.load for optimizer state, JSON for the rest


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    plain = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Write model, optimizer, scheduler, RNG and loop position; atomic (tmp dir then rename)."""
    from safetensors.torch import save_file, save_model

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    rng_tensors, rng_plain = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_plain}))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; a key mismatch is a ModelError naming the keys."""
    from safetensors.torch import load_file, load_model

    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise ModelError(f"{path}: checkpoint does not fit the model; missing: {sorted(missing)[:8]}, "
                         f"unexpected: {sorted(unexpected)[:8]}")
    opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    state = json.loads((path / "state.json").read_text())
    _set_rng_state(load_file(str(path / "rng.safetensors")), state.pop("rng"))
    return state


def latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / CHECKPOINT_DIR).glob("step_*[0-9]"))
    return ckpts[-1] if ckpts else None


def _prune_checkpoints(out_dir: Path, keep: int) -> None:
    ckpts = sorted((out_dir / CHECKPOINT_DIR).glob("step_*[0-9]"))
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _record_precision(out: Path, mixed_precision: str) -> None:
    """The mixed precision this run resolved to, in meta.json (the config may just say auto)."""
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta["mixed_precision"] = mixed_precision
    meta_path.write_text(json.dumps(meta, indent=2))
    log.info("mixed precision: %s", mixed_precision)


def _build_optimization(task: Task, oc: Any, total_steps: int):
    optimizer = torch.optim.AdamW(_param_groups(task.model, oc.weight_decay), lr=oc.lr,
                                  betas=(oc.beta1, oc.beta2), eps=oc.eps)
    # stepped by hand once per optimiser step (accelerate's wrapper would scale it by world size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(oc.warmup_steps, total_steps, oc.min_lr_ratio))
    return optimizer, scheduler


def _build_loader(task: Task, tc: TrainConfigLike) -> tuple[DataLoader, EpochSampler]:
    dataset = task.train_dataset()
    if len(dataset) < tc.batch_size:
        raise ConfigError(f"training set has {len(dataset)} samples, fewer than train.batch_size={tc.batch_size}")
    lengths = None
    if tc.group_by_length:
        if not hasattr(task, "train_lengths"):
            raise ConfigError("train.group_by_length: this stage's samples have no length to group by "
                              "(it applies to align and instruct)")
        lengths = task.train_lengths()
    sampler = EpochSampler(len(dataset), tc.seed, lengths, tc.batch_size)
    # the loader's own generator: creating an iterator (e.g. on resume) must not draw from global RNG
    loader = DataLoader(dataset, batch_size=tc.batch_size, sampler=sampler, collate_fn=task.collate,
                        drop_last=True, num_workers=tc.num_workers,
                        generator=torch.Generator().manual_seed(tc.seed))
    return loader, sampler


def _evaluate(task: Task, model: nn.Module) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        results = task.evaluate()
    model.train()
    return results


def _fresh_accelerate_state() -> None:
    """accelerate keeps one state per process and refuses a second ``Accelerator`` with another
    device or mixed precision (a GPU run, then ``train.cpu=true``, in one notebook or CV script).
    A single-process run starts from a fresh state; under a distributed launch the state holds
    the process group and every run shares the launch's settings, so it is kept."""
    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_training(cfg: Any, make_task: Callable[[], Task]) -> Path:
    """Train the task ``make_task()`` builds under ``cfg.train`` / ``cfg.optim``; return the run dir.

    The seed is set before the task is built, so model initialisation is reproducible too.
    A run directory that holds checkpoints is resumed (``train.resume``) from the newest one.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    tc, oc = cfg.train, cfg.optim
    if tc.steps < 1 or tc.batch_size < 1 or tc.grad_accum < 1:
        raise ConfigError("train.steps, train.batch_size and train.grad_accum must be >= 1")
    out = Path(tc.out_dir)
    # sync_with_dataloader off: optimiser steps fall every grad_accum micro-batches across epoch
    # ends, so a checkpoint (always taken right after a step) resumes in phase
    mixed_precision = resolve_mixed_precision(tc.mixed_precision, tc.cpu)
    _fresh_accelerate_state()
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=tc.grad_accum, sync_with_dataloader=False),
        mixed_precision=mixed_precision, cpu=tc.cpu,
    )
    set_seed(tc.seed)
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not tc.resume:
        raise ConfigError(f"{out} holds checkpoints from an earlier run; set train.resume=true or another train.out_dir")
    if accelerator.is_main_process:
        save_config(cfg, out)
        _record_precision(out, mixed_precision)
    task = make_task()
    loader, _ = _build_loader(task, tc)
    optimizer, scheduler = _build_optimization(task, oc, tc.steps)
    model, optimizer, loader = accelerator.prepare(task.model, optimizer, loader)
    task.model = model
    trainable = [p for p in model.parameters() if p.requires_grad]

    metrics = MetricsLog(out / "metrics.csv")
    pos = {"step": 0, "epoch": 0, "batch_in_epoch": 0}  # the data position a resume restores
    if ckpt is not None:
        pos = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
        metrics.load(keep_until=pos["step"])
        log.info("resumed from %s (step %d)", ckpt, pos["step"])

    window: dict[str, float] = {}
    window_n, window_samples, window_t0, paused = 0, 0, time.perf_counter(), 0.0
    model.train()
    while pos["step"] < tc.steps:
        epoch_loader = (accelerator.skip_first_batches(loader, pos["batch_in_epoch"])
                        if pos["batch_in_epoch"] else loader)
        # accelerate's loader re-sets the sampler's epoch from its own counter on every pass
        epoch_loader.set_epoch(pos["epoch"])
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                losses = task.training_step(batch)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise ModelError(f"loss is {loss.item()} at step {pos['step'] + 1}; lower optim.lr?")
                accelerator.backward(loss)  # divides by grad_accum
                if accelerator.sync_gradients and oc.grad_clip > 0:
                    accelerator.clip_grad_norm_(trainable, oc.grad_clip)
                optimizer.step()  # a no-op until the last micro-batch of the step
                optimizer.zero_grad(set_to_none=True)
            pos["batch_in_epoch"] += 1
            for name, value in {"loss": loss, **losses}.items():
                window[name] = window.get(name, 0.0) + float(value.detach())
            window_n += 1
            window_samples += tc.batch_size * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            pos["step"] += 1
            step, last = pos["step"], pos["step"] >= tc.steps

            if step % tc.log_every == 0 or step == 1 or last:
                elapsed = time.perf_counter() - window_t0 - paused  # throughput excludes eval and saving
                row = {"step": step, "epoch": pos["epoch"], "lr": scheduler.get_last_lr()[0],
                       **{f"train/{k}": v / window_n for k, v in window.items()},
                       "samples_per_s": window_samples / max(elapsed, 1e-9)}
                metrics.add(row)
                log.info("step %d/%d loss %.4f lr %.2e", step, tc.steps, row["train/loss"], row["lr"])
                window, window_n, window_samples, window_t0, paused = {}, 0, 0, time.perf_counter(), 0.0

            pause_t0 = time.perf_counter()
            if (tc.eval_every and step % tc.eval_every == 0) or last:
                results = _evaluate(task, model)
                if results:
                    metrics.add({"step": step, "epoch": pos["epoch"], **{f"val/{k}": v for k, v in results.items()}})
                    log.info("step %d eval %s", step, ", ".join(f"{k} {v:.4f}" for k, v in results.items()))

            if (tc.save_every and step % tc.save_every == 0) or last:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(out / CHECKPOINT_DIR / f"step_{step:07d}", accelerator.unwrap_model(model),
                                    optimizer, scheduler, dict(pos))
                    _prune_checkpoints(out, tc.keep_checkpoints)
                    metrics.save()
                    metrics.plot(out / "loss_curve.png")
            paused += time.perf_counter() - pause_t0
            if last:
                break
        else:  # the epoch ran out before the last step
            pos["epoch"] += 1
            pos["batch_in_epoch"] = 0

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        task.model = accelerator.unwrap_model(model)
        task.save_final(out)
        record_run_weights(out)  # meta.json: the final weights' hash beside version and commit
        metrics.save()
        metrics.plot(out / "loss_curve.png")
    return out
