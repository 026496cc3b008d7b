"""The shared training loop on a toy regression task: schedule, sampling, accumulation, resume."""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from pathvlm.errors import ConfigError
from pathvlm.train.config import OptimConfig, TrainConfig
from pathvlm.train.loop import (
    EpochSampler,
    cosine_with_warmup,
    resolve_mixed_precision,
    run_training,
)


class NoisyLinear(Dataset):
    """y = x @ w + noise whose draw depends only on the sample seed (like augmentation does)."""

    def __init__(self, n: int = 40):
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        index, seed = key
        noise = torch.randn((), generator=torch.Generator().manual_seed(seed)) * 0.01
        return self.x[index], self.y[index] + noise


class ToyTask:
    def __init__(self):
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 1))  # dropout: global RNG
        self.data = NoisyLinear()

    def train_dataset(self):
        return self.data

    def collate(self, items):
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def training_step(self, batch):
        x, y = batch
        return {"mse": nn.functional.mse_loss(self.model(x).squeeze(-1), y)}

    def evaluate(self):
        with torch.no_grad():
            return {"mse": float(nn.functional.mse_loss(self.model(self.data.x).squeeze(-1), self.data.y))}

    def save_final(self, out_dir: Path):
        torch.save(self.model.state_dict(), out_dir / "toy.pt")


@dataclass
class ToyConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def _cfg(out: Path, **train) -> ToyConfig:
    base = {"out_dir": str(out), "steps": 30, "batch_size": 8, "eval_every": 10, "save_every": 10, "log_every": 1, "cpu": True}
    return ToyConfig(TrainConfig(**{**base, **train}), OptimConfig(lr=0.1, warmup_steps=3, weight_decay=0.0, beta2=0.99))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _train_losses(out: Path) -> dict[int, float]:
    return {int(r["step"]): float(r["train/loss"]) for r in _rows(out / "metrics.csv") if r.get("train/loss")}


def test_cosine_warmup_shape():
    f = cosine_with_warmup(warmup=4, total=20, min_ratio=0.1)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_epoch_sampler_is_a_seeded_permutation():
    s = EpochSampler(10, seed=3)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10)) and first == list(s)
    s.set_epoch(1)
    second = list(s)
    assert [i for i, _ in second] != [i for i, _ in first]
    assert len({seed for _, seed in first + second}) == 20  # every draw gets its own augmentation seed


def test_mixed_precision_choice(monkeypatch):
    from pathvlm import precision

    monkeypatch.delenv(precision.ENV_VAR, raising=False)
    precision._auto.cache_clear()
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert resolve_mixed_precision("auto", cpu=True) == "no"
    precision._auto.cache_clear()
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert resolve_mixed_precision("auto", cpu=True) == "bf16"
    precision._auto.cache_clear()
    assert resolve_mixed_precision("fp32", cpu=True) == "no"
    assert resolve_mixed_precision("bf16", cpu=True) == "bf16"
    with pytest.raises(ConfigError):
        resolve_mixed_precision("fp16", cpu=True)


def test_loss_decreases_and_run_dir_is_complete(tmp_path):
    out = run_training(_cfg(tmp_path / "run"), ToyTask)
    losses = _train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    assert sum(list(losses.values())[-5:]) < 0.3 * sum(list(losses.values())[:5])
    for name in ("config.yaml", "meta.json", "metrics.csv", "loss_curve.png", "toy.pt"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000020", "step_0000030"]
    evals = [r for r in _rows(out / "metrics.csv") if r.get("val/mse")]
    assert [int(r["step"]) for r in evals] == [10, 20, 30]


class LengthToyTask(ToyTask):
    """The toy task with a token count per sample, for ``train.group_by_length``."""

    def train_lengths(self):
        return [3 + (7 * i) % 11 for i in range(len(self.data))]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("grad_accum", [1, 3])
def test_resume_after_kill_gives_the_same_losses(tmp_path, grad_accum, grouped):
    out = tmp_path / "run"
    task = LengthToyTask if grouped else ToyTask
    cfg = _cfg(out, steps=24, save_every=8, keep_checkpoints=3, grad_accum=grad_accum, group_by_length=grouped)
    run_training(cfg, task)
    full = _train_losses(out)
    final = torch.load(out / "toy.pt", weights_only=True)
    # a run killed after step 16's checkpoint: the newer checkpoint and the final weights never existed
    shutil.rmtree(out / "checkpoints" / "step_0000024")
    (out / "toy.pt").unlink()
    run_training(cfg, task)
    resumed = _train_losses(out)
    assert sorted(resumed) == list(range(1, 25))
    for step in range(17, 25):  # 40 samples / batch 8: epochs end mid-way, so data position matters
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), step
    again = torch.load(out / "toy.pt", weights_only=True)
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    out = run_training(_cfg(tmp_path / "run", steps=6, grad_accum=3, eval_every=0, save_every=0), ToyTask)
    losses = _train_losses(out)
    assert sorted(losses) == list(range(1, 7))
    assert (out / "checkpoints" / "step_0000006").is_dir()


def test_fresh_run_refuses_old_checkpoints(tmp_path):
    run_training(_cfg(tmp_path / "run", steps=2, save_every=1), ToyTask)
    with pytest.raises(ConfigError, match="resume"):
        run_training(_cfg(tmp_path / "run", steps=2, resume=False), ToyTask)


def test_batch_larger_than_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        run_training(_cfg(tmp_path / "run", batch_size=64), ToyTask)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_train_configs_resolve(path):
    from pathvlm.train import list_stages, load_stage_config

    stage = path.stem.split("_")[0]
    assert stage in list_stages()
    cfg = load_stage_config(stage, path, ["train.steps=5"])
    assert cfg.train.steps == 5 and cfg.optim.lr > 0


def test_runs_in_one_process_each_get_their_own_precision(tmp_path):
    """accelerate's process-wide state refused a second run with another mixed precision (or a CPU
    run after a GPU one), as in a notebook or a CV script; each single-process run starts fresh."""
    first = run_training(_cfg(tmp_path / "bf16", steps=4, mixed_precision="bf16"), ToyTask)
    second = run_training(_cfg(tmp_path / "fp32", steps=4, mixed_precision="fp32"), ToyTask)
    assert (first / "toy.pt").is_file() and (second / "toy.pt").is_file()
    with (second / "metrics.csv").open() as fh:
        assert len([r for r in csv.DictReader(fh) if r.get("train/loss")]) >= 2


def test_group_by_length_batches_similar_lengths_and_stays_a_seeded_permutation():
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 200, (1000,), generator=rng).tolist()

    def batches(sampler, epoch):
        sampler.set_epoch(epoch)
        order = [i for i, _ in sampler]
        return order, [order[k:k + 8] for k in range(0, 1000, 8)]

    grouped = EpochSampler(1000, seed=5, lengths=lengths, batch_size=8)
    order, groups = batches(grouped, 0)
    assert sorted(order) == list(range(1000))  # every sample once per epoch
    assert batches(EpochSampler(1000, seed=5, lengths=lengths, batch_size=8), 0)[0] == order  # seeded
    assert batches(grouped, 1)[0] != order  # and fresh each epoch

    def padded(groups):  # token slots a batch pads to, over the tokens it holds
        return sum(8 * max(lengths[i] for i in g) for g in groups) / sum(lengths)

    _, plain = batches(EpochSampler(1000, seed=5), 0)
    assert padded(groups) < 1.1 and padded(plain) > 1.5
    # the batches of a sorted run are shuffled: the epoch does not walk from long to short
    tops = [max(lengths[i] for i in g) for g in groups[:32]]
    assert tops != sorted(tops, reverse=True)
    with pytest.raises(ValueError, match="3 lengths for 4 samples"):
        EpochSampler(4, seed=0, lengths=[1, 2, 3])


def test_group_by_length_needs_a_stage_with_lengths(tmp_path):
    with pytest.raises(ConfigError, match="group_by_length"):
        run_training(_cfg(tmp_path / "run", steps=2, group_by_length=True), ToyTask)
