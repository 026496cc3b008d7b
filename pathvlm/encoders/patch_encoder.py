"""`PatchEncoder`: an open_clip model behind the small interface the rest of pathvlm uses.

It carries its own config so `save(dir)` writes an open_clip-style folder (`open_clip_config.json`
+ `open_clip_model.safetensors`) that `local-dir:<dir>` rebuilds bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pathvlm.encoders.archs import resolve_hf_name, resolve_text_cfg
from pathvlm.errors import ModelError

if TYPE_CHECKING:
    from pathvlm.stain import LabReference, StainReference

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# weights of an HF text tower (CustomTextCLIP) that its package provides; the projection is not here
PACKAGE_TEXT_PREFIX = "text.transformer."


# timm trunks whose bf16 embeddings miss #20's "equal to fp32" (min cosine >= 0.999 on real tiles):
# EfficientNet-Lite0 (the demo encoder) reaches min 0.997 (mean 0.9995) on the 42 CRC val tiles,
# flips 24 of 1,500 PCam val predictions, and no single layer kept in fp32 fixes it (its ~50
# depthwise/pointwise convs each round their output; the net is as sensitive to half a grey
# level of input noise). `auto` keeps these in fp32; the ViT families pass and run in bf16.
REDUCED_PRECISION_UNEQUAL = {
    "efficientnet": "EfficientNet bf16 embeddings are not equal to fp32 (measured on the Lite0 demo encoder: "
                    "min cosine 0.997 on real tiles, < 0.999; 24 of 1,500 PCam val predictions change)",
}


def reduced_precision_note(model_cfg: dict[str, Any]) -> str:
    """Why this open_clip config's image tower is not equal to fp32 in bf16; "" when it is."""
    trunk = str(model_cfg.get("vision_cfg", {}).get("timm_model_name") or "")
    return next((note for key, note in REDUCED_PRECISION_UNEQUAL.items() if key in trunk), "")


def build_clip(model_cfg: dict[str, Any], pretrained_text: bool) -> nn.Module:
    """Instantiate an open_clip CLIP / CustomTextCLIP from a model config dict (random vision init).

    ``pretrained_text`` loads the HF text tower's own weights (local copy when installed); it is
    off when a full checkpoint is about to overwrite them anyway.
    """
    import open_clip

    cfg = resolve_text_cfg(model_cfg)
    custom_text = cfg.pop("custom_text", False)
    is_hf_text = "hf_model_name" in cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        raise ModelError("CoCa-style models (multimodal_cfg) are not supported as patch encoders")
    if is_hf_text:
        cfg["text_cfg"]["hf_model_pretrained"] = pretrained_text
    model_class = open_clip.CustomTextCLIP if (custom_text or is_hf_text) else open_clip.CLIP
    try:
        return model_class(**cfg)
    except (OSError, TypeError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot build open_clip model from config: {exc}") from exc


def _drop_text_tower(model: nn.Module) -> None:
    """Remove the text tower so a vision-only encoder neither holds nor saves it."""
    if hasattr(model, "text"):  # CustomTextCLIP
        del model.text
        return
    for attr in ("transformer", "token_embedding", "ln_final"):
        if hasattr(model, attr):
            delattr(model, attr)
    for attr in ("positional_embedding", "text_projection"):
        if attr in model._parameters:
            del model._parameters[attr]
    if "attn_mask" in model._buffers:
        del model._buffers["attn_mask"]


def state_dict_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Short sha256 over names, dtypes, shapes and raw bytes: equal iff the weights are identical."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


TEST_VIEWS = (1, 2, 4, 8)  # test-time views of a plain-image tile (pathvlm.embed.tile_views)


def views_problem(value: Any) -> str | None:
    """Why ``value`` is not a number of test-time views, or None when it is one."""
    if isinstance(value, bool) or value not in TEST_VIEWS:
        return f"test_views must be one of {', '.join(map(str, TEST_VIEWS))}, got {value!r}"
    return None


class PatchEncoder(nn.Module):
    """Image (and optionally text) encoder with a fixed output size ``embed_dim``.

    Attributes:
        name: the name it was created from (recorded in feature files).
        embed_dim: size D of ``encode_image`` / ``encode_text`` outputs.
        weights_hash: short sha256 of the weights, so features from different weights never mix.
        has_text: whether ``encode_text`` is available.
        stain_norm: a `pathvlm.stain.StainReference` (Macenko) or `LabReference` (Reinhard) that
            every image is normalised to before the transform, or None; saved in the config's
            ``pathvlm`` section.
        tile_mpp: the um/px of the tiles it was trained on (None: not recorded); plain images
            given with their own pixel size are resampled to it. Saved in the ``pathvlm`` section.
        test_views: how many turns and mirror images of each plain-image tile are embedded and
            averaged (`pathvlm.embed.tile_views`: 1, 2, 4 or 8; whole slides are not). Saved in
            the ``pathvlm`` section.
        random_weights: built from a seeded random init (tests and benchmarks only).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        model_cfg: dict[str, Any],
        preprocess_cfg: dict[str, Any],
        vision_only: bool = False,
    ):
        super().__init__()
        if vision_only:
            _drop_text_tower(model)
        self.name = name
        self.model = model
        self.model_cfg = copy.deepcopy(model_cfg)
        self.preprocess_cfg = dict(preprocess_cfg)
        self.has_text = not vision_only
        self.embed_dim = int(model_cfg["embed_dim"])
        self._tokenizer = None
        self.weights_hash = state_dict_hash(self.model.state_dict())
        self.stain_norm: StainReference | LabReference | None = None
        self.tile_mpp: float | None = None
        # source pixels of one tile at tile_mpp, which the transform resizes to the input size
        # (None: tiles are cut at the input size)
        self.tile_size: int | None = None
        self.test_views = 1
        self.random_weights = False
        self.precision = "fp32"  # of the image tower; see set_precision
        self.reduced_precision_note = reduced_precision_note(self.model_cfg)  # "" where bf16 is equal

    def refresh_hash(self) -> str:
        """Recompute ``weights_hash`` from the weights and the stain reference (both change the
        features, so cached features of either never mix); returns it."""
        digest = state_dict_hash(self.model.state_dict())
        if self.stain_norm is not None:
            ref = json.dumps(self.stain_norm.to_dict(), sort_keys=True)
            digest = hashlib.sha256(f"{digest}|stain_norm|{ref}".encode()).hexdigest()[:16]
        self.weights_hash = digest
        return digest

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_precision(self, precision: str) -> PatchEncoder:
        """Run the image tower in ``precision`` (``auto``/``fp32``/``bf16``/``fp16``); returns self.

        Weights are cast (`pathvlm.precision.cast_module`): norms stay fp32, and so does the
        text tower (it runs once per prompt set, not once per tile, so it gains nothing worth a
        rounding error). ``weights_hash`` stays the hash of the fp32 weights: feature files
        record their precision separately. Inference only; training keeps fp32 weights.
        ``auto`` keeps fp32 for a trunk whose bf16 embeddings were measured unequal to fp32
        (`reduced_precision_note`); asking for ``bf16`` by name still runs it in bf16.
        """
        from pathvlm.precision import cast_module, resolve_for

        precision = resolve_for(precision, self.device, not self.reduced_precision_note,
                                f"encoder {self.name}", self.reduced_precision_note)
        if precision != self.precision:
            cast_module(self.model.visual, precision, keep_fp32=("logit_scale",))
            self.precision = precision
        return self

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, D] embeddings (L2-normalised if asked).

        The tower runs in ``self.precision``; the output, and its L2 normalisation, are fp32
        (a norm over D channels in bf16 would round every coordinate twice).
        """
        if self.precision == "fp32":
            return self.model.encode_image(images, normalize=normalize)
        from pathvlm.precision import dtype_of

        feats = self.model.encode_image(images.to(dtype_of(self.precision)), normalize=False).float()
        return nn.functional.normalize(feats, dim=-1) if normalize else feats  # [B, D] fp32

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    def tokenizer(self):
        """The open_clip tokenizer matching the text tower (built on first use)."""
        if not self.has_text:
            raise ModelError(f"encoder {self.name} has no text tower (it was built vision-only)")
        if self._tokenizer is None:
            from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

            text_cfg = self.model_cfg["text_cfg"]
            context_length = text_cfg.get("context_length", 77)
            if "hf_tokenizer_name" in text_cfg:
                name = resolve_hf_name(text_cfg["hf_tokenizer_name"])
                self._tokenizer = HFTokenizer(name, context_length=context_length)
            else:
                self._tokenizer = SimpleTokenizer(context_length=context_length)
        return self._tokenizer

    def encode_text(self, texts: list[str], normalize: bool = False) -> torch.Tensor:
        """list of T strings -> [T, D] embeddings in the same space as ``encode_image``."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenizer()(list(texts)).to(self.device)  # [T, L]
        return self.model.encode_text(tokens, normalize=normalize)

    def save(self, out_dir: str | Path, omit_package_text: bool = False) -> Path:
        """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` into ``out_dir``.

        Args:
            omit_package_text: leave out the HF text transformer's weights (``text.transformer.*``),
                for a text tower that was kept frozen at its pretrained weights; loading then takes
                them from the pretrained model (its local package when installed). The text
                projection and everything else are still saved. Only for HF text towers.
        """
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if omit_package_text:
            if "hf_model_name" not in self.model_cfg.get("text_cfg", {}) or not self.has_text:
                raise ModelError(f"encoder {self.name}: omit_package_text needs an HF text tower")
            tensors = {k: v for k, v in tensors.items() if not k.startswith(PACKAGE_TEXT_PREFIX)}
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "encoder_name": self.name,
            "vision_only": not self.has_text,
            "weights_hash": self.weights_hash,
        }
        if omit_package_text:
            meta["text_transformer_from"] = self.model_cfg["text_cfg"]["hf_model_name"]
        if self.stain_norm is not None:  # not in preprocess_cfg: open_clip rejects unknown keys
            meta["stain_norm"] = self.stain_norm.to_dict()
        if self.tile_mpp is not None:
            meta["tile_mpp"] = float(self.tile_mpp)
        if self.tile_size is not None:
            meta["tile_size"] = int(self.tile_size)
        if self.test_views != 1:
            meta["test_views"] = int(self.test_views)
        config = {"model_cfg": self.model_cfg, "preprocess_cfg": self.preprocess_cfg, "pathvlm": meta}
        (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(out_dir / WEIGHTS_NAME))
        return out_dir
