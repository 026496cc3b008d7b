"""`mil` stage: an aggregator + linear head learns slide labels from cached patch features.

Writes `<run>/mil/` (`mil.safetensors` + `mil.json`); `load_mil_classifier(run)` reads it back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pathvlm.data import read_mil_csv
from pathvlm.errors import ConfigError, ModelError
from pathvlm.train.clip_task import balanced_accuracy
from pathvlm.train.config import MilModelConfig, MilStageConfig

log = logging.getLogger(__name__)


class MilClassifier(nn.Module):
    """features [B, N, D] + mask [B, N] -> logits [B, C]: aggregator tokens, mean over K, linear head."""

    def __init__(self, in_dim: int, labels: list[str], cfg: MilModelConfig):
        super().__init__()
        from pathvlm.model.aggregators import create_aggregator

        self.in_dim, self.labels, self.cfg = in_dim, list(labels), cfg
        self.aggregator = create_aggregator(cfg.aggregator, in_dim=in_dim, hidden_dim=cfg.hidden_dim,
                                            n_tokens=cfg.n_tokens, dropout=cfg.dropout)
        with torch.no_grad():  # the token width is whatever this aggregator produces
            tokens, _ = self.aggregator(torch.zeros(1, 2, in_dim), torch.ones(1, 2, dtype=torch.bool))
        self.head = nn.Linear(tokens.shape[-1], len(labels))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, attention = self.aggregator(features, mask)  # [B, K, D_out], [B, K, N]
        return self.head(tokens.mean(1)), attention  # [B, C]

    def save(self, out_dir: Path) -> Path:
        from safetensors.torch import save_model

        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(self, str(out_dir / "mil.safetensors"))
        meta = {"in_dim": self.in_dim, "labels": self.labels, "model": vars(self.cfg)}
        (out_dir / "mil.json").write_text(json.dumps(meta, indent=2))
        return out_dir


def load_mil_classifier(path: str | Path) -> MilClassifier:
    """Rebuild a MilClassifier from ``<run>/mil`` (or the run directory itself), loading strictly."""
    from safetensors.torch import load_model

    path = Path(path)
    folder = path / "mil" if (path / "mil" / "mil.json").is_file() else path
    try:
        meta = json.loads((folder / "mil.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder}: not a MIL classifier directory ({exc})") from exc
    model = MilClassifier(meta["in_dim"], meta["labels"], MilModelConfig(**meta["model"]))
    missing, unexpected = load_model(model, str(folder / "mil.safetensors"), strict=False)
    if missing or unexpected:
        raise ModelError(f"{folder}: weights do not fit; missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    return model.eval()


class BagDataset(Dataset):
    """(index, sample_seed) -> (features [n, D] with n <= max_patches, label index)."""

    def __init__(self, bags: list[torch.Tensor], targets: list[int], max_patches: int):
        self.bags, self.targets, self.max_patches = bags, targets, max_patches

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key
        bag = self.bags[index]
        if len(bag) > self.max_patches:  # a random subset per step regularises and bounds memory
            keep = torch.randperm(len(bag), generator=torch.Generator().manual_seed(seed))[: self.max_patches]
            bag = bag[keep.sort().values]
        return bag, self.targets[index]


def collate_bags(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad bags to the longest: features [B, N, D], mask [B, N] (True = real patch), labels [B]."""
    n_max = max(len(b) for b, _ in items)
    dim = items[0][0].shape[1]
    feats = torch.zeros(len(items), n_max, dim)
    mask = torch.zeros(len(items), n_max, dtype=torch.bool)
    for i, (bag, _) in enumerate(items):
        feats[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return feats, mask, torch.tensor([y for _, y in items])


class MilTask:
    def __init__(self, cfg: MilStageConfig):
        from pathvlm.features import load_features

        if not cfg.data.labels:
            raise ConfigError("mil stage needs data.labels (CSV slide_id,features,label[,split])")
        rows = read_mil_csv(cfg.data.labels)
        if all(r.split is None for r in rows):
            raise ConfigError(f"{cfg.data.labels}: add a split column ({cfg.data.train_split}/{cfg.data.val_split})")
        train = [r for r in rows if r.split == cfg.data.train_split]
        val = [r for r in rows if r.split == cfg.data.val_split]
        if not train:
            raise ConfigError(f"{cfg.data.labels}: no rows with split {cfg.data.train_split!r}")
        self.labels = sorted({r.label for r in train})
        unseen = sorted({r.label for r in val} - set(self.labels))
        if unseen:
            raise ConfigError(f"{cfg.data.labels}: val labels {', '.join(unseen)} never occur in training rows")
        loaded = {r.features: load_features(r.features) for r in train + val}
        sources = {(b.attrs.get("encoder"), b.attrs.get("encoder_weights_hash")) for b in loaded.values()
                   if b.attrs.get("encoder_weights_hash")}
        if len(sources) > 1:  # one classifier reads one embedding space
            raise ConfigError(f"{cfg.data.labels}: feature files come from different encoders "
                              f"{sorted(f'{n} ({h})' for n, h in sources)}; re-embed with one encoder")
        bags = {k: b.features.float() for k, b in loaded.items()}
        dims = {b.shape[1] for b in bags.values()}
        if len(dims) != 1:
            raise ConfigError(f"{cfg.data.labels}: feature files have different widths {sorted(dims)}")
        self.cfg = cfg
        self.train_set = BagDataset([bags[r.features] for r in train], [self.labels.index(r.label) for r in train],
                                    cfg.data.max_patches)
        self.val = [(bags[r.features], self.labels.index(r.label)) for r in val]
        self.model = MilClassifier(dims.pop(), self.labels, cfg.model)

    def train_dataset(self) -> Dataset:
        return self.train_set

    def collate(self, items: list[tuple[torch.Tensor, int]]) -> Any:
        return collate_bags(items)

    def training_step(self, batch: Any) -> dict[str, torch.Tensor]:
        feats, mask, labels = batch
        logits, _ = self.model(feats, mask)  # [B, C]
        return {"ce": nn.functional.cross_entropy(logits, labels)}

    def evaluate(self) -> dict[str, float]:
        """Slide-level accuracy, balanced accuracy and loss on the val split, all patches."""
        if not self.val:
            return {}
        device = next(self.model.parameters()).device
        y_true, y_pred, loss = [], [], 0.0
        for bag, label in self.val:
            feats, mask, target = collate_bags([(bag, label)])
            logits, _ = self.model(feats.to(device), mask.to(device))
            loss += float(nn.functional.cross_entropy(logits, target.to(device)))
            y_true.append(label)
            y_pred.append(int(logits.argmax(-1)))
        acc = sum(int(a == b) for a, b in zip(y_true, y_pred)) / len(y_true)
        return {"acc": acc, "bacc": balanced_accuracy(y_true, y_pred), "loss": loss / len(y_true)}

    def save_final(self, out_dir: Path) -> None:
        self.model.save(Path(out_dir) / "mil")
