"""`clip` stage: contrastive image-text training of an open_clip encoder from pairs JSONL.

Evaluation is zero-shot accuracy on the val pairs (their `label`s) with the class prompts; the
final encoder is saved with `PatchEncoder.save`, so `local-dir:<run>/encoder` reloads it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from pathvlm.data import load_class_set, read_pairs
from pathvlm.errors import ConfigError, ModelError, SlideError
from pathvlm.train.augment import TrainTransform
from pathvlm.train.config import ClipStageConfig

log = logging.getLogger(__name__)

TEXT_FREE = ("logit_scale", "logit_bias")  # belong to neither tower
TEXT_PROJ_PREFIXES = ("text.proj", "text_projection")  # the text tower's output projection


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise SlideError(path, f"cannot read image ({exc})") from exc


class PairDataset(Dataset):
    """Pairs records -> (augmented image [3, S, S], caption); keyed by (index, sample_seed)."""

    def __init__(self, records: list[dict[str, Any]], transform: TrainTransform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str]:
        index, seed = key
        rec = self.records[index]
        return self.transform(_open_rgb(rec["image"]), seed), rec["text"]


def freeze_towers(
    model: torch.nn.Module, lock_image: bool, lock_text: bool, train_text_proj: bool = False
) -> None:
    """Turn off gradients for the image tower (``visual.*``) and/or everything text-side.

    ``train_text_proj`` keeps the text output projection trainable under ``lock_text``, so a
    pretrained language model stays fixed while its projection into the shared space learns.
    """
    for name, param in model.named_parameters():
        is_image = name.startswith("visual.")
        is_proj = train_text_proj and name.startswith(TEXT_PROJ_PREFIXES)
        frozen_text = not is_image and name not in TEXT_FREE and lock_text and not is_proj
        if (is_image and lock_image) or frozen_text:
            param.requires_grad_(False)


def balanced_accuracy(y_true: list[int], y_pred: list[int]) -> float:
    """Mean recall over the classes present in ``y_true``."""
    recalls = []
    for c in sorted(set(y_true)):
        idx = [i for i, y in enumerate(y_true) if y == c]
        recalls.append(sum(y_pred[i] == c for i in idx) / len(idx))
    return float(sum(recalls) / len(recalls))


class ClipTask:
    """Model = the encoder's open_clip module; loss = open_clip's ClipLoss."""

    def __init__(self, cfg: ClipStageConfig):
        import open_clip
        from accelerate import PartialState
        from open_clip.transform import PreprocessCfg

        from pathvlm.encoders import create_encoder

        if not cfg.data.train:
            raise ConfigError("clip stage needs data.train (a pairs JSONL with image paths)")
        self.cfg = cfg
        self.encoder, self.eval_transform = create_encoder(cfg.model.encoder, device="cpu")
        if not self.encoder.has_text:
            raise ModelError(f"encoder {cfg.model.encoder} has no text tower; the clip stage needs one")
        self.model = self.encoder.model
        freeze_towers(self.model, cfg.model.lock_image, cfg.model.lock_text,
                      cfg.model.train_text_proj)
        pre = PreprocessCfg(**self.encoder.preprocess_cfg)
        size = pre.size if isinstance(pre.size, int) else pre.size[0]
        self.transform = TrainTransform(size, pre.mean, pre.std, cfg.augment)
        self.records = read_pairs(cfg.data.train)
        if any("image" not in r for r in self.records):
            raise ConfigError(f"{cfg.data.train}: the clip stage trains on pixels; every record needs 'image'")
        state = PartialState()
        self.loss = open_clip.ClipLoss(local_loss=state.num_processes > 1, gather_with_grad=True,
                                       rank=state.process_index, world_size=state.num_processes)
        self.val = self._load_val(cfg) if cfg.data.val else None

    def _load_val(self, cfg: ClipStageConfig) -> dict[str, Any]:
        if not cfg.data.classes:
            raise ConfigError("data.val is set but data.classes (class description YAML) is not")
        classes = load_class_set(cfg.data.classes)
        records = [r for r in read_pairs(cfg.data.val) if "image" in r]
        unknown = sorted({str(r.get("label")) for r in records} - set(classes.labels))
        if unknown:
            raise ConfigError(f"{cfg.data.val}: labels {', '.join(unknown)} are not in {cfg.data.classes}")
        # one record per image: several captions of one image must not count twice
        images = sorted({r["image"]: classes.labels.index(r["label"]) for r in records}.items())
        return {"classes": classes, "images": images}

    def train_dataset(self) -> Dataset:
        return PairDataset(self.records, self.transform)

    def collate(self, items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([img for img, _ in items])  # [B, 3, S, S]
        tokens = self.encoder.tokenizer()([text for _, text in items])  # [B, L]
        return images, tokens

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, tokens = batch
        image_features, text_features, logit_scale = self.model(images, tokens)[:3]
        return {"contrastive": self.loss(image_features, text_features, logit_scale)}

    def evaluate(self) -> dict[str, float]:
        """Zero-shot accuracy and balanced accuracy over the val images."""
        if self.val is None:
            return {}
        classes = self.val["classes"]
        device = self.encoder.device
        class_emb = []
        for label in classes.labels:
            emb = self.encoder.encode_text(classes.prompts(label), normalize=True)  # [P, D]
            class_emb.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
        class_emb = torch.stack(class_emb)  # [C, D]
        y_true, y_pred = [], []
        items = self.val["images"]
        for start in range(0, len(items), 64):
            chunk = items[start:start + 64]
            x = torch.stack([self.eval_transform(_open_rgb(path)) for path, _ in chunk]).to(device)
            emb = self.encoder.encode_image(x, normalize=True)  # [B, D]
            y_pred += (emb @ class_emb.T).argmax(-1).tolist()
            y_true += [y for _, y in chunk]
        accuracy = sum(int(a == b) for a, b in zip(y_true, y_pred)) / len(y_true)
        return {"zeroshot_acc": accuracy, "zeroshot_bacc": balanced_accuracy(y_true, y_pred)}

    def save_final(self, out_dir: Path) -> None:
        from pathvlm.encoders.patch_encoder import state_dict_hash

        self.encoder.model = self.model
        self.encoder.weights_hash = state_dict_hash(self.model.state_dict())
        self.encoder.save(Path(out_dir) / "encoder")
        log.info("saved encoder to %s (load with local-dir:%s)", out_dir / "encoder", out_dir / "encoder")
