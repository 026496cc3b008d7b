"""Build and load the foundation encoders of `foundation.py`: the published architecture, strict weights.

`load_foundation(spec, weights)` reads a hub folder copied as is (config.json + weights) or one
weights file; `build_foundation(spec)` is the same architecture with random weights (tests,
benchmarks). Weights are read with safetensors or weights-only torch.load, never unpickled code;
every key and shape must match, else one ModelError line names the first mismatches.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pathvlm.encoders.foundation import FoundationSpec
from pathvlm.encoders.patch_encoder import state_dict_hash
from pathvlm.errors import ModelError

log = logging.getLogger(__name__)

_SHOW = 4  # mismatches named per kind in an error line


class FoundationEncoder(nn.Module):
    """A published patch encoder behind the PatchEncoder interface (name, embed_dim, encode_image).

    Attributes:
        spec: the registry facts (pooling, scale, licence...).
        tile_mpp, tile_size: the scale and tile side it was trained on; embedding defaults to them.
        weights_hash: short sha256 of the weights (feature files record it).
        weights_source: the file the weights came from, or None for random weights.
    """

    def __init__(self, spec: FoundationSpec, backbone: nn.Module, name: str | None = None,
                 hash_now: bool = True):
        super().__init__()
        self.spec = spec
        self.name = name or spec.name
        self.backbone = backbone
        self.embed_dim = spec.embed_dim
        self.preprocess_cfg = spec.preprocess_cfg()
        self.has_text = spec.has_text
        self.stain_norm = None
        self.tile_mpp = spec.mpp
        self.tile_size = spec.tile_size
        self.weights_source: str | None = None
        # hashing GBs takes seconds: a loader hashes once, after the weights are in
        self.weights_hash = self.refresh_hash() if hash_now else ""

    def refresh_hash(self) -> str:
        self.weights_hash = state_dict_hash(self.backbone.state_dict())
        return self.weights_hash

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def logit_scale(self) -> torch.Tensor | None:
        """A CLIP-style model's learned temperature (log scale), which zero-shot uses."""
        return getattr(self.backbone, "logit_scale", None)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    precision = "fp32"  # see set_precision

    def set_precision(self, precision: str) -> FoundationEncoder:
        """Run the backbone in ``precision`` (auto/fp32/bf16/fp16; `pathvlm.precision.cast_module`:
        norms stay fp32); returns self. Encoders with a text tower stay fp32: their image and text
        parts share one backbone here, and the text side gains nothing from bf16."""
        from pathvlm.precision import cast_module, resolve_precision

        precision = resolve_precision(precision, self.device)
        if self.has_text and precision != "fp32":
            log.info("%s has a text tower: kept in fp32", self.name)
            precision = "fp32"
        if precision != self.precision:
            cast_module(self.backbone, precision, keep_fp32=("logit_scale",))
            self.precision = precision
        return self

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, embed_dim] fp32 (L2-normalised, in fp32, if asked)."""
        if self.precision != "fp32":
            from pathvlm.precision import dtype_of

            images = images.to(dtype_of(self.precision))
        feats = self.image_features(images).float()
        return nn.functional.normalize(feats, dim=-1) if normalize else feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        raise ModelError(f"encoder {self.name} has no text tower")

    def encode_text(self, texts: list[str], normalize: bool = False) -> torch.Tensor:
        """list of T strings -> [T, embed_dim] in the image embedding space (text towers only)."""
        if not self.has_text:
            raise ModelError(f"encoder {self.name} has no text tower (zero-shot needs one)")
        feats = self.text_features([texts] if isinstance(texts, str) else list(texts))
        return nn.functional.normalize(feats, dim=-1) if normalize else feats


def _pool(tokens: torch.Tensor, pooling: str, n_prefix: int) -> torch.Tensor:
    """[B, T, D] tokens (class token first, then registers) -> [B, D] or [B, 2D]."""
    cls = tokens[:, 0]
    if pooling == "cls":
        return cls
    if pooling == "cls+mean":  # register tokens are not patches
        return torch.cat([cls, tokens[:, n_prefix:].mean(1)], dim=-1)
    raise ModelError(f"unknown pooling {pooling!r}")


class TimmEncoder(FoundationEncoder):
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "avg":  # CNN/Swin: the model's own average over the feature map
            return self.backbone.forward_head(self.backbone.forward_features(images))
        tokens = self.backbone.forward_features(images)  # [B, T, D], final norm applied
        return _pool(tokens, self.spec.pooling, int(self.backbone.num_prefix_tokens))


class HFEncoder(FoundationEncoder):
    """transformers ViTModel / Dinov2Model / Dinov2WithRegistersModel / CLIPModel."""

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.spec.pooling == "clip":
            return _tensor(self.backbone.get_image_features(pixel_values=images))
        tokens = self.backbone(pixel_values=images).last_hidden_state  # [B, T, D]
        n_prefix = 1 + int(getattr(self.backbone.config, "num_register_tokens", 0) or 0)
        return _pool(tokens, self.spec.pooling, n_prefix)

    def tokenizer(self):
        if not self.has_text:
            raise ModelError(f"encoder {self.name} has no text tower")
        from open_clip.tokenizer import SimpleTokenizer

        # CLIP's own BPE (the tokenizer PLIP was trained with), bundled with open_clip: no files
        return SimpleTokenizer(context_length=self.backbone.config.text_config.max_position_embeddings)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer()(texts).to(self.device)  # [T, 77]; pooled at the end-of-text token
        return _tensor(self.backbone.get_text_features(input_ids=ids))


def _tensor(out: Any) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------- architectures


def _timm_kwargs(spec: FoundationSpec, overrides: dict[str, Any] | None) -> dict[str, Any]:
    import timm.layers

    kwargs = {**spec.kwargs, **(overrides or {})}
    if "mlp_layer" in kwargs:
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    if "act_layer" in kwargs:
        kwargs["act_layer"] = getattr(nn, kwargs["act_layer"])
    return kwargs


def _build_timm(spec: FoundationSpec, overrides: dict[str, Any] | None,
                random_init: bool = True) -> nn.Module:
    import timm

    # weights about to be overwritten need no (slow) random init
    skip = {} if random_init else {"weight_init": "skip"}
    return timm.create_model(spec.arch, pretrained=False, **_timm_kwargs(spec, overrides), **skip)


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 convolutions (BN, ReLU) and a 1x1 projection
    in place of Swin's 4x4 patchify; NHWC out, as timm's Swin expects."""

    def __init__(self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 96, norm_layer: Any = None, **_: Any):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ModelError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        width = embed_dim // 8
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width),
            nn.ReLU(True), nn.Conv2d(2 * width, embed_dim, 1))
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # [B, H/4, W/4, C]


def _build_ctranspath(spec: FoundationSpec, overrides: dict[str, Any] | None) -> nn.Module:
    import timm

    return timm.create_model(spec.arch, pretrained=False, embed_layer=ConvStem,
                             **{**spec.kwargs, **(overrides or {})})


class AttentionalPooler(nn.Module):
    """CoCa-style pooling: learned queries cross-attend to the trunk's tokens (CONCH)."""

    def __init__(self, d_model: int = 768, context_dim: int = 1024, n_head: int = 8,
                 n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.heads
        q = self.to_q(self.ln_q(self.query))  # [Q, d]
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # [B, N, d] each
        q = q.view(1, -1, h, q.shape[-1] // h).transpose(1, 2).expand(b, -1, -1, -1)  # [B, h, Q, dh]
        k, v = (t.view(b, n, h, -1).transpose(1, 2) for t in (k, v))  # [B, h, N, dh]
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # [B, h, Q, N]
        out = (attn @ v).transpose(1, 2).reshape(b, -1, h * v.shape[-1])  # [B, Q, d]
        return self.to_out(out)


class ConchV15Vision(nn.Module):
    """CONCH v1.5 vision tower: ViT-L/16 trunk, one-query attentional pooler, LayerNorm."""

    def __init__(self, spec: FoundationSpec, overrides: dict[str, Any] | None,
                 random_init: bool = True):
        super().__init__()
        self.trunk = _build_timm(spec, overrides, random_init)
        self.attn_pool_contrast = AttentionalPooler(spec.embed_dim, self.trunk.embed_dim, 8, 1)
        self.ln_contrast = nn.LayerNorm(spec.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # [B, T, 1024]
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # [B, 768]


class ConchV15Encoder(FoundationEncoder):
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


_HF_CLASSES = {  # family -> (config class, model class, model_type values its config.json may carry)
    "hf_vit": ("ViTConfig", "ViTModel", ("vit",)),
    "hf_dinov2": ("Dinov2Config", "Dinov2Model", ("dinov2",)),
    "hf_dinov2_reg": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                      ("dinov2", "dinov2_with_registers")),
    "hf_clip": ("CLIPConfig", "CLIPModel", ("clip",)),
}
_HF_META_KEYS = ("auto_map", "architectures", "_name_or_path", "model_type",
                 "transformers_version", "torch_dtype", "dtype")


def _hf_config(spec: FoundationSpec, data: dict[str, Any], source: str) -> Any:
    import transformers

    config_cls, _, types = _HF_CLASSES[spec.family]
    if data.get("model_type", types[0]) not in types:
        raise ModelError(f"{source}: config.json is a {data.get('model_type')!r} model, "
                         f"encoder {spec.name} is {spec.arch} ({'/'.join(types)})")
    config = getattr(transformers, config_cls)(
        **{k: v for k, v in data.items() if k not in _HF_META_KEYS})
    width_key = "projection_dim" if spec.family == "hf_clip" else "hidden_size"
    want = spec.kwargs.get(width_key)
    if want is not None and getattr(config, width_key, None) != want:
        raise ModelError(f"{source}: config.json has {width_key} {getattr(config, width_key)}, "
                         f"encoder {spec.name} expects {want}")
    return config


def build_hf(spec: FoundationSpec, overrides: dict[str, Any] | None = None) -> nn.Module:
    """The transformers model of ``spec`` from its published config values, random weights."""
    import transformers

    config = _hf_config(spec, _merge(spec.kwargs, overrides or {}), spec.name)
    model_cls = getattr(transformers, _HF_CLASSES[spec.family][1])
    return model_cls(config, add_pooling_layer=False) if spec.family == "hf_vit" else model_cls(config)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


_ENCODER_CLASSES = {"timm": TimmEncoder, "ctranspath": TimmEncoder, "conch_v15": ConchV15Encoder,
                    **{family: HFEncoder for family in _HF_CLASSES}}


def build_foundation(spec: FoundationSpec, overrides: dict[str, Any] | None = None,
                     random_init: bool = True) -> FoundationEncoder:
    """The published architecture of ``spec`` with random weights (never a substitute for the real
    ones: tests and benchmarks only). ``overrides`` change build arguments, e.g. ``{"depth": 2}``;
    ``random_init=False`` skips initialisation (and hashing) for weights loaded next."""
    if spec.family == "timm":
        backbone = _build_timm(spec, overrides, random_init)
    elif spec.family == "ctranspath":
        backbone = _build_ctranspath(spec, overrides)
    elif spec.family == "conch_v15":
        backbone = ConchV15Vision(spec, overrides, random_init)
    elif spec.family in _HF_CLASSES:
        backbone = build_hf(spec, overrides)
    else:
        raise ModelError(f"encoder {spec.name}: no random-weight build for family {spec.family!r}")
    return _ENCODER_CLASSES[spec.family](spec, backbone.eval(), hash_now=random_init)
