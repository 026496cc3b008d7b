"""`clip` stage: contrastive image-text training of an open_clip encoder from pairs JSONL.

Evaluation is zero-shot accuracy on the val pairs (their `label`s) with the class prompts; the
final encoder is saved with `PatchEncoder.save`, so `local-dir:<run>/encoder` reloads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from pathvlm.data import load_class_set, read_pairs
from pathvlm.errors import ConfigError, ModelError, SlideError
from pathvlm.stain import LabReference
from pathvlm.train.augment import TrainTransform
from pathvlm.train.config import ClipStageConfig

log = logging.getLogger(__name__)

TEXT_FREE = ("logit_scale", "logit_bias")  # belong to neither tower
TEXT_PROJ_PREFIXES = ("text.proj", "text_projection")  # the text tower's output projection
STAIN_FIT_IMAGES = 64  # train images the Macenko reference is fitted on


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise SlideError(path, f"cannot read image ({exc})") from exc


class PairDataset(Dataset):
    """Pairs records -> (augmented image [3, S, S], caption); keyed by (index, sample_seed).

    ``stain``, when given, normalises each image (PIL -> PIL) before the augmentation, so stain
    jitter varies the colours around the normalised ones, as inference will see them.
    """

    def __init__(self, records: list[dict[str, Any]], transform: TrainTransform,
                 stain: Callable[[Image.Image], Image.Image] | None = None):
        self.records, self.transform, self.stain = records, transform, stain
        # what makes two pairs positives of each other under the unicl loss: the label, else the
        # caption; ids from the sorted set, so every process and loader worker agrees
        keys = [f"label:{r['label']}" if r.get("label") is not None else f"text:{r['text']}"
                for r in records]
        ids = {k: i for i, k in enumerate(sorted(set(keys)))}
        self.groups = [ids[k] for k in keys]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str, int]:
        index, seed = key
        rec = self.records[index]
        image = _open_rgb(rec["image"])
        if self.stain is not None:
            image = self.stain(image)
        return self.transform(image, seed), rec["text"], self.groups[index]


class UniClLoss(torch.nn.Module):
    """Image-text contrastive loss with label-aware targets (UniCL, Yang et al. 2022).

    Pairs of one ``group`` (same label) are all positives of each other: each row's target is
    uniform over them, in both directions (image -> texts, text -> images). With every group
    distinct this is exactly the CLIP loss. Features are gathered across processes, as in
    open_clip's ClipLoss with gather_with_grad.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist
            from open_clip.loss import gather_features

            image_features, text_features = gather_features(
                image_features, text_features, gather_with_grad=True, rank=self.rank,
                world_size=self.world_size)
            all_groups = [torch.zeros_like(groups) for _ in range(self.world_size)]
            dist.all_gather(all_groups, groups)
            groups = torch.cat(all_groups)
        # in fp32 under any autocast: the logit scale reaches 100, and a bf16 product of it with
        # cosines keeps ~2 significant digits, too coarse for the softmax over the batch
        with torch.autocast(image_features.device.type, enabled=False):
            logits = logit_scale.float() * image_features.float() @ text_features.float().T  # [B, B]
            targets = (groups[:, None] == groups[None, :]).float()  # [B, B], symmetric
            targets = targets / targets.sum(1, keepdim=True)
            loss_i = -(targets * logits.log_softmax(1)).sum(1).mean()
            loss_t = -(targets * logits.T.log_softmax(1)).sum(1).mean()
        return (loss_i + loss_t) / 2


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


def _eval_mode_hook(module: torch.nn.Module, _inputs: Any) -> None:
    module.eval()  # a frozen norm layer: running statistics, never batch statistics


def freeze_trunk_groups(visual: torch.nn.Module, unlocked_groups: int) -> int:
    """Freeze all but the last ``unlocked_groups`` timm layer groups of an open_clip timm tower.

    The projection head stays trainable. BatchNorm layers of the frozen groups are pinned to eval
    mode by a forward pre-hook, so neither their statistics drift nor train-time normalisation
    differs from inference; unlike open_clip's ``freeze_bn_stats`` this keeps the state-dict layout
    (FrozenBatchNorm2d drops ``num_batches_tracked``), so the saved encoder reloads strictly.
    Returns the number of trunk parameters left trainable.
    """
    from timm.models import group_modules, group_parameters

    trunk = getattr(visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "group_matcher"):
        raise ConfigError("model.image_unlocked_groups needs a timm image trunk (vision_cfg.timm_model_name)")
    matcher = trunk.group_matcher()
    groups = group_parameters(trunk, matcher)
    last_frozen = max(groups) - unlocked_groups
    for gid, names in groups.items():
        for name in names:
            trunk.get_parameter(name).requires_grad_(gid > last_frozen)
    frozen_modules = {name for name, gid in group_modules(trunk, matcher, reverse=True).items()
                      if gid <= last_frozen}
    for name, module in trunk.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and (
                name in frozen_modules or name.rsplit(".", 1)[0] in frozen_modules):
            module.register_forward_pre_hook(_eval_mode_hook)
    return sum(p.numel() for p in trunk.parameters() if p.requires_grad)


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

        from pathvlm.encoders import create_encoder, native_tile_size

        if not cfg.data.train:
            raise ConfigError("clip stage needs data.train (a pairs JSONL with image paths)")
        self.cfg = cfg
        # random-init towers start from the run's seed, not the fixed per-architecture one
        self.encoder, self.eval_transform = create_encoder(cfg.model.encoder, device="cpu",
                                                           init_seed=cfg.train.seed)
        if not self.encoder.has_text:
            raise ModelError(f"encoder {cfg.model.encoder} has no text tower; the clip stage needs one")
        self.model = self.encoder.model
        freeze_towers(self.model, cfg.model.lock_image, cfg.model.lock_text,
                      cfg.model.train_text_proj)
        # convolutional trunks run ~1.6x faster on CPU with NHWC activations (measured, lite0)
        self.channels_last = hasattr(getattr(self.model.visual, "trunk", None), "conv_stem")
        if self.channels_last:
            self.model.visual.to(memory_format=torch.channels_last)
        if cfg.model.image_unlocked_groups >= 0 and not cfg.model.lock_image:
            n = freeze_trunk_groups(self.model.visual, cfg.model.image_unlocked_groups)
            log.info("image trunk: last %d layer groups trainable (%d params)",
                     cfg.model.image_unlocked_groups, n)
        self.records = read_pairs(cfg.data.train)
        if any("image" not in r for r in self.records):
            raise ConfigError(f"{cfg.data.train}: the clip stage trains on pixels; every record needs 'image'")
        self._set_stain_reference(cfg)
        pre = PreprocessCfg(**self.encoder.preprocess_cfg)
        size = pre.size if isinstance(pre.size, int) else pre.size[0]
        lab = self.encoder.stain_norm if isinstance(self.encoder.stain_norm, LabReference) else None
        if cfg.augment.randstain > 0 and lab is None:
            raise ConfigError("augment.randstain samples around a Reinhard template: set model.stain_norm=reinhard")
        self.transform = TrainTransform(size, pre.mean, pre.std, cfg.augment, lab=lab,
                                        tile=native_tile_size(self.encoder))
        state = PartialState()
        if cfg.model.loss == "unicl":
            self.loss = UniClLoss(rank=state.process_index, world_size=state.num_processes)
        elif cfg.model.loss == "clip":
            self.loss = open_clip.ClipLoss(local_loss=state.num_processes > 1, gather_with_grad=True,
                                           rank=state.process_index, world_size=state.num_processes)
        else:
            raise ConfigError(f"model.loss: {cfg.model.loss!r} is not one of ['clip', 'unicl']")
        self.val = self._load_val(cfg) if cfg.data.val else None
        self.text_cache = self._cache_frozen_text()

    def _cache_frozen_text(self) -> tuple[dict[str, int], torch.Tensor] | None:
        """Pooled outputs of a frozen HF text transformer for every distinct caption, or None.

        With the transformer frozen (``lock_text``) only its projection learns, so its output for
        a caption never changes: running it once per distinct caption instead of once per pair
        and step removes most of a step's cost (a few hundred distinct captions against ~20 000
        pairs seen in a run). The features are taken in eval mode: a frozen tower gets no dropout.
        """
        text = getattr(self.model, "text", None)
        proj = getattr(text, "proj", None)
        if text is None or proj is None or not hasattr(text, "transformer"):
            return None  # open_clip's built-in text tower: no cache
        if any(p.requires_grad for name, p in text.named_parameters() if not name.startswith("proj.")):
            return None
        captions = sorted({r["text"] for r in self.records})
        was_training = text.training
        text.eval()
        text.proj = torch.nn.Identity()  # open_clip's own forward, pooling included, minus the projection
        try:
            with torch.no_grad():
                pooled = torch.cat([text(self.encoder.tokenizer()(captions[i:i + 64]))
                                    for i in range(0, len(captions), 64)])  # [T, width]
        finally:
            text.proj = proj
            text.train(was_training)
        log.info("frozen text tower: cached %d distinct captions", len(captions))
        return {c: i for i, c in enumerate(captions)}, pooled

    def _set_stain_reference(self, cfg: ClipStageConfig) -> None:
        """Fit (``macenko``, ``reinhard``) or keep (``""``) the encoder's stain reference.

        Rebuilds the eval transform. A Macenko reference normalises whole images before the
        augmentation (``self.stain``); a Reinhard one is applied per crop by the train transform.
        """
        from pathvlm.encoders import build_transform
        from pathvlm.stain import (
            StainNormalizer,
            fit_lab_reference,
            fit_reference,
            reference_images,
        )

        fitters = {"macenko": fit_reference, "reinhard": fit_lab_reference}
        method = cfg.model.stain_norm
        if method not in ("", *fitters):
            raise ConfigError(f"model.stain_norm: {method!r} is not one of {['', *fitters]}")
        if method:
            # a seeded subset across the whole set, not the first files (often all one class)
            distinct = {r["image"] for r in self.records}
            paths = reference_images(list(distinct), STAIN_FIT_IMAGES)  # sorted, seeded subset
            try:
                reference = fitters[method]((_open_rgb(p) for p in paths), max_images=len(paths))
            except ModelError as exc:
                raise ModelError(f"{cfg.data.train}: model.stain_norm={method}: {exc}") from exc
            log.info("model.stain_norm=%s: stain reference fitted on %d of %d train images",
                     method, len(paths), len(distinct))
            self.encoder.stain_norm = reference
        elif self.encoder.stain_norm is not None:
            log.info("encoder %s carries a stain reference: train images are normalised to it",
                     cfg.model.encoder)
        self.eval_transform = build_transform(self.encoder)
        whole_image = self.encoder.stain_norm is not None and not isinstance(self.encoder.stain_norm, LabReference)
        self.stain = StainNormalizer(self.encoder.stain_norm) if whole_image else None

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
        return PairDataset(self.records, self.transform, self.stain)

    def collate(self, items: list[tuple[torch.Tensor, str, int]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = torch.stack([img for img, _, _ in items])  # [B, 3, S, S]
        texts = [text for _, text, _ in items]
        if self.text_cache is not None:  # [B] rows of the cached pooled captions
            text = torch.tensor([self.text_cache[0][t] for t in texts])
        else:
            text = self.encoder.tokenizer()(texts)  # [B, L] tokens
        groups = torch.tensor([g for _, _, g in items])  # [B] positive-group ids
        return images, text, groups

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        images, text, groups = batch
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.text_cache is not None:
            image_features, _, logit_scale = self.model(images, None)[:3]
            proj = self.encoder.model.text.proj  # the unwrapped module: its weights are the trained ones
            pooled = self.text_cache[1].to(image_features.device)[text.to(image_features.device)]
            text_features = torch.nn.functional.normalize(proj(pooled), dim=-1)  # [B, D]
        else:
            image_features, text_features, logit_scale = self.model(images, text)[:3]
        if isinstance(self.loss, UniClLoss):
            return {"contrastive": self.loss(image_features, text_features, logit_scale, groups)}
        return {"contrastive": self.loss(image_features, text_features, logit_scale)}

    def evaluate(self) -> dict[str, float]:
        """Zero-shot accuracy and balanced accuracy over the val images."""
        from pathvlm.embed import pooled_image_embeddings
        from pathvlm.encoders import native_tile_size

        if self.val is None:
            return {}
        classes = self.val["classes"]
        device = self.encoder.device
        class_emb = []
        for label in classes.labels:
            emb = self.encoder.encode_text(classes.prompts(label), normalize=True)  # [P, D]
            class_emb.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
        class_emb = torch.stack(class_emb)  # [C, D]
        items = self.val["images"]
        emb = pooled_image_embeddings([path for path, _ in items], self.encoder, self.eval_transform,
                                      native_tile_size(self.encoder), device=device, load=_open_rgb)
        y_pred = (emb.to(class_emb.device) @ class_emb.T).argmax(-1).tolist()  # images tiled as in chat
        y_true = [y for _, y in items]
        accuracy = sum(int(a == b) for a, b in zip(y_true, y_pred)) / len(y_true)
        return {"zeroshot_acc": accuracy, "zeroshot_bacc": balanced_accuracy(y_true, y_pred)}

    def save_final(self, out_dir: Path) -> None:
        self.encoder.model = self.model
        self.encoder.refresh_hash()
        self.encoder.save(Path(out_dir) / "encoder")
        log.info("saved encoder to %s (load with local-dir:%s)", out_dir / "encoder", out_dir / "encoder")
