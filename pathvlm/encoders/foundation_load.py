"""Load a foundation encoder's weights: a hub folder copied as is, one weights file, or the hub.

Strict: every key and shape must match the published architecture, else one ModelError line
naming the first mismatches. Weights are read with safetensors or ``torch.load(weights_only=True)``.
Models whose code lives in their authors' package (CONCH, MUSK) load through it when installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvlm.encoders.foundation import FOUNDATION_PREFIX, FoundationSpec, get_foundation_spec
from pathvlm.encoders.foundation_models import (
    _HF_CLASSES,
    _SHOW,
    FoundationEncoder,
    _hf_config,
    _merge,
    build_foundation,
)
from pathvlm.errors import ModelError

log = logging.getLogger(__name__)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or weights-only torch.load; common containers unwrapped."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors/unpickler raise many types; all mean "not readable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(f"{path}: cannot read weights safely ({type(exc).__name__}: {first})") from exc
    for key in ("model", "state_dict", "module"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _names(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    """Every key and shape of ``state`` must match ``module``; else one line naming the first."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = [f"{label}: {_names(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("wrong shapes (file vs model)", shapes)) if keys]
    if problems:
        raise ModelError(f"{source}: weights do not match {what}; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def weights_file(spec: FoundationSpec, path: Path) -> Path:
    """The weights file of a hub folder (first of ``spec.files`` present) or the file itself."""
    if path.is_dir():
        for name in spec.files:
            if (path / name).is_file():
                return path / name
        raise ModelError(f"{path}: no weights file for {spec.name} (expected one of "
                         f"{', '.join(spec.files)}; download {spec.hub_id})")
    if path.is_file():
        return path
    raise ModelError(f"{path}: weights path not found")


def _check_timm_config(spec: FoundationSpec, folder: Path) -> None:
    config = folder / "config.json"
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config}: unreadable config.json ({exc})") from exc
    arch = data.get("architecture") if isinstance(data, dict) else None
    if arch and arch != spec.arch:
        raise ModelError(f"{config}: names architecture {arch}, encoder {spec.name} is {spec.arch}")


def _load_timm_like(spec: FoundationSpec, path: Path, overrides: dict[str, Any] | None
                    ) -> FoundationEncoder:
    file = weights_file(spec, path)
    encoder = build_foundation(spec, overrides, random_init=False)
    if path.is_dir():
        _check_timm_config(spec, path)
    state = read_weights(file)
    target: nn.Module = encoder.backbone
    if spec.family == "ctranspath":
        from timm.models.swin_transformer import checkpoint_filter_fn

        # the published file uses old timm's layout (downsample at the end of a stage); timm's
        # own converter renames it and drops derived buffers (attention masks, position index)
        state = checkpoint_filter_fn(state, target)
    elif spec.family == "conch_v15" and "trunk.pos_embed" in state:
        from timm.layers import resample_abs_pos_embed

        grid = target.trunk.patch_embed.grid_size
        if state["trunk.pos_embed"].shape != target.trunk.pos_embed.shape:
            # the released position table is resampled to the 448 px grid, as its authors do
            state["trunk.pos_embed"] = resample_abs_pos_embed(
                state["trunk.pos_embed"], new_size=grid, num_prefix_tokens=1,
                interpolation="bilinear", antialias=False, verbose=False)
    load_strict(target, state, str(file), f"{spec.name} ({spec.arch})")
    return _done(encoder, file)


def _done(encoder: FoundationEncoder, file: Path) -> FoundationEncoder:
    encoder.weights_source = str(file)
    encoder.refresh_hash()
    return encoder


def _load_hf(spec: FoundationSpec, path: Path) -> FoundationEncoder:
    """transformers' own loader (it knows each model's historical key names), checked strictly."""
    import transformers

    model_cls = getattr(transformers, _HF_CLASSES[spec.family][1])
    file = weights_file(spec, path)
    with tempfile.TemporaryDirectory(prefix="pathvlm-hf-") as tmp:
        folder = path if path.is_dir() and (path / "config.json").is_file() else Path(tmp)
        config_path = folder / "config.json"
        if folder == Path(tmp):  # a lone weights file: the published config values
            config_path.write_text(json.dumps(spec.kwargs))
        if file.parent != folder or file.name not in ("model.safetensors", "pytorch_model.bin"):
            os.symlink(file.resolve(), Path(tmp) / (
                "model.safetensors" if file.suffix == ".safetensors" else "pytorch_model.bin"))
            if folder != Path(tmp):
                (Path(tmp) / "config.json").write_text(config_path.read_text())
            folder = Path(tmp)
        try:
            data = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{path}: unreadable config.json ({exc})") from exc
        config = _hf_config(spec, data, str(path))
        extra = {"add_pooling_layer": False} if spec.family == "hf_vit" else {}
        try:
            model, info = model_cls.from_pretrained(
                str(folder), config=config, local_files_only=True, output_loading_info=True,
                use_safetensors=file.suffix == ".safetensors", **extra)
        except (OSError, RuntimeError, ValueError) as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if "mismatch" in ln),
                         str(exc).splitlines()[0] if str(exc) else "")
            raise ModelError(f"{file}: weights do not match {spec.name} ({spec.arch}); {first}") from exc
    unexpected = sorted(k for k in info.get("unexpected_keys", ())
                        if not (spec.family == "hf_vit" and k.startswith("pooler.")))  # unused head
    problems = [f"{label}: {_names(sorted(keys))}" for label, keys in
                (("missing keys", list(info.get("missing_keys", ()))),
                 ("unexpected keys", unexpected),
                 ("wrong shapes", [str(k) for k in info.get("mismatched_keys", ())])) if keys]
    if problems:
        raise ModelError(f"{file}: weights do not match {spec.name} ({spec.arch}); " + "; ".join(problems))
    from pathvlm.encoders.foundation_models import HFEncoder

    return _done(HFEncoder(spec, model.float().eval(), hash_now=False), file)


def _load_open_clip(name: str, spec: FoundationSpec, path: Path, vision_only: bool):
    from pathvlm.encoders.patch_encoder import CONFIG_NAME
    from pathvlm.encoders.registry import _create_openclip, _from_config_and_weights

    file = weights_file(spec, path)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        encoder, _ = _from_config_and_weights(name, path / CONFIG_NAME, file, vision_only)
    else:
        encoder, _ = _create_openclip(name, f"{spec.arch}@{file}", vision_only)
    # the published QuiltNet preprocessing, not open_clip's default for a bare architecture
    encoder.preprocess_cfg = {**spec.preprocess_cfg(), **encoder.preprocess_cfg}
    encoder.tile_mpp, encoder.tile_size = spec.mpp, spec.tile_size
    return encoder


def _needs_package(spec: FoundationSpec) -> Any:
    import importlib

    try:
        return importlib.import_module(spec.package)
    except ImportError as exc:
        raise ModelError(
            f"encoder {spec.name} loads through its authors' package `{spec.package}`, which is "
            f"not installed ({exc.name} missing); install it from their repository, then pass "
            f"the weights of {spec.hub_id}") from exc


class _ConchV1(FoundationEncoder):
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images, proj_contrast=True, normalize=False)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        from conch.open_clip_custom import get_tokenizer, tokenize

        ids = tokenize(texts=texts, tokenizer=get_tokenizer()).to(self.device)
        return self.backbone.encode_text(ids, normalize=False)


class _Musk(FoundationEncoder):
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(image=images, with_head=False, out_norm=False, ms_aug=False,
                             return_global=True)[0]


def _load_package(spec: FoundationSpec, path: Path) -> FoundationEncoder:
    _needs_package(spec)
    file = weights_file(spec, path)
    if spec.family == "conch":
        from conch.open_clip_custom import create_model

        model, cls = create_model(spec.arch, pretrained=None), _ConchV1
    else:
        import timm
        from musk import modeling  # noqa: F401  (registers the MUSK architecture with timm)

        model, cls = timm.create_model(spec.arch), _Musk
    load_strict(model, read_weights(file), str(file), f"{spec.name} ({spec.arch})")
    return _done(cls(spec, model.eval(), hash_now=False), file)


def _download(spec: FoundationSpec) -> Path:
    """The hub folder of ``spec`` (``HF_TOKEN`` for gated repos; cached by huggingface_hub)."""
    from huggingface_hub import snapshot_download

    repo, _, sub = spec.hub_id.partition(":")
    patterns = [f"{sub}/*" if sub else "*.json", *(f"{sub}/{f}" if sub else f for f in spec.files)]
    try:
        folder = snapshot_download(repo, repo_type="dataset" if sub else None,
                                   allow_patterns=patterns)
    except Exception as exc:  # network, auth (gated) and offline-cache errors all end here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"encoder {spec.name}: cannot download {spec.hub_id} ({type(exc).__name__}: {first}); "
            "gated models need an accepted licence and HF_TOKEN; offline, pass --weights DIR "
            "(README: Bring your foundation model)") from exc
    return Path(folder) / sub if sub else Path(folder)


def load_foundation(spec: FoundationSpec, weights: str | Path | None, name: str | None = None,
                    vision_only: bool = False, overrides: dict[str, Any] | None = None) -> Any:
    """The encoder of ``spec`` with its weights from ``weights`` (folder or file; None: the hub).

    ``overrides`` change build arguments (tests load depth-reduced copies of giant models).
    """
    if spec.family == "remote_code":
        raise ModelError(
            f"encoder {spec.name}: its architecture ships only as remote code in {spec.hub_id}; "
            "pathvlm never runs downloaded code, so it cannot load it")
    if spec.package:
        _needs_package(spec)  # before any download
    path = Path(weights).expanduser() if weights is not None else _download(spec)
    if weights is not None and not path.exists():
        raise ModelError(f"{path}: weights path not found")
    if spec.family == "open_clip":
        return _load_open_clip(name or spec.name, spec, path, vision_only)
    if spec.package:
        encoder = _load_package(spec, path)
    elif spec.family in _HF_CLASSES:
        if overrides:
            spec = dataclasses.replace(spec, kwargs=_merge(spec.kwargs, overrides))
        encoder = _load_hf(spec, path)
    else:
        encoder = _load_timm_like(spec, path, overrides)
    encoder.name = name or spec.name
    if vision_only:
        encoder.has_text = False
    log.info("loaded %s from %s (weights %s)", encoder.name, encoder.weights_source,
             encoder.weights_hash)
    return encoder


def _build_from_registry(name: str, spec_text: str, weights: Any, vision_only: bool):
    from pathvlm.encoders.registry import build_transform

    spec = get_foundation_spec(spec_text[len(FOUNDATION_PREFIX):])
    if spec is None:
        raise ModelError(f"unknown foundation encoder {spec_text!r}")
    encoder = load_foundation(spec, weights, name=name, vision_only=vision_only)
    return encoder, build_transform(encoder)
