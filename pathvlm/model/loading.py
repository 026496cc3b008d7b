"""Run directories (config.yaml, meta.json, *.safetensors, adapter/, llm/) and named models."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from pathvlm.errors import ModelError
from pathvlm.provenance import hash_weight_files, record_run_weights
from pathvlm.resources import demo_weights_dir

log = logging.getLogger(__name__)

# registered name -> run directory (the demo ships inside the package: pathvlm/model/weights/demo)
_MODELS: dict[str, Path] = {
    "demo": demo_weights_dir(),
}
_PARTS = ("encoder", "aggregator", "projector")


def list_models() -> list[str]:
    return sorted(_MODELS)


def load_strict(module: nn.Module, path: Path) -> None:
    """Load safetensors into ``module``; any missing or unexpected key is a ModelError by name."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (OSError, ValueError) as exc:  # safetensors raises SafetensorError, a ValueError-like
        raise ModelError(f"{path}: cannot read weights ({exc})") from exc
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not match the model; missing keys: {missing or 'none'}; "
                         f"unexpected keys: {unexpected or 'none'}")
    for key, value in module.state_dict().items():
        if value.shape != state[key].shape:
            raise ModelError(f"{path}: {key} has shape {tuple(state[key].shape)}, model expects "
                             f"{tuple(value.shape)}")
    module.load_state_dict(state, strict=True)


def save_model_dir(model: Any, out_dir: Path) -> Path:
    """Write a self-describing run directory that ``load_model`` reads back."""
    from safetensors.torch import save_model

    from pathvlm.config import save_config

    if getattr(model, "lora_merged", False):
        raise ModelError(f"cannot save to {out_dir}: this model's LoRA adapter was merged into the LLM "
                         "for inference; load it with load_model(..., merge_lora=False) to save or train it")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(model.cfg, out_dir)
    for part in _PARTS:
        module = getattr(model, part)
        if part == "encoder" and getattr(module, "weights_source", None):
            continue  # a foundation encoder reloads from its own weights (cfg.encoder), never copied
        if module is not None:
            save_model(module, str(out_dir / f"{part}.safetensors"))
    if hasattr(model.llm, "peft_config"):
        model.llm.save_pretrained(str(out_dir / "adapter"))
    elif model.cfg.llm_config:  # a from-scratch LLM belongs to the run
        model.llm.save_pretrained(str(out_dir / "llm"))
        model.tokenizer.save_pretrained(str(out_dir / "llm"))
    if getattr(model, "calibration", None) is not None:  # scores of these weights; voided by a new encoder
        from pathvlm.calibration import FILE_NAME

        model.calibration.save(out_dir / FILE_NAME)
    meta_path = out_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.update({"kind": "pathvlm", "parts": [p for p in _PARTS if getattr(model, p) is not None]})
    if getattr(model.encoder, "weights_source", None):  # a reload must find the same weights
        meta["foundation_encoder_weights_hash"] = model.encoder.weights_hash
    meta_path.write_text(json.dumps(meta, indent=2))
    model.weights_hash = record_run_weights(out_dir).get("weights_hash")
    return out_dir


def load_part(module: nn.Module, file: Path) -> None:
    """Strictly load one part's weights; an encoder's hash then describes the weights it holds
    (provenance and the embedding cache are keyed by it)."""
    load_strict(module, file)
    if hasattr(module, "refresh_hash"):
        module.refresh_hash()


def join_llm_device(vlm: Any) -> Any:
    """The device bitsandbytes placed a quantised LLM on; the encoder, aggregator and projector
    move there (``PathVLM.device`` is the projector's)."""
    device = next(vlm.llm.parameters()).device
    for part in _PARTS:
        if getattr(vlm, part) is not None:
            getattr(vlm, part).to(device)
    return device


def _load_run_dir(run: Path, merge_lora: bool = True) -> Any:
    from pathvlm.config import load_config
    from pathvlm.model.vlm import ModelConfig, build_model

    cfg = load_config(ModelConfig, run / "config.yaml")
    llm = None
    if (run / "llm").is_dir():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, info = AutoModelForCausalLM.from_pretrained(str(run / "llm"), output_loading_info=True)
        bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
        if bad:
            raise ModelError(f"{run / 'llm'}: LLM weights do not match its config: {bad}")
        llm = (model.eval(), AutoTokenizer.from_pretrained(str(run / "llm")))
    vlm = build_model(cfg, llm=llm)
    for part in _PARTS:
        module, file = getattr(vlm, part), run / f"{part}.safetensors"
        if module is None:
            continue
        if file.is_file():
            load_part(module, file)
        elif part != "encoder":  # an encoder may come unchanged from its own registry weights
            raise ModelError(f"{run}: missing {file.name}")
    meta_path = run / "meta.json"
    want = json.loads(meta_path.read_text()).get("foundation_encoder_weights_hash") if meta_path.is_file() else None
    if want and vlm.encoder is not None and vlm.encoder.weights_hash != want:
        raise ModelError(f"{run}: trained on encoder weights {want}, but {cfg.encoder} has weights "
                         f"{vlm.encoder.weights_hash}; pass the same encoder weights")
    if (run / "adapter").is_dir():
        from peft import PeftModel

        vlm.llm = PeftModel.from_pretrained(vlm.llm, str(run / "adapter"))
        if merge_lora:
            # for inference: W + BA folded into one matrix (fp32, before any precision cast), so
            # decoding runs the plain LLM's layers instead of three matmuls per adapted layer
            vlm.llm = vlm.llm.merge_and_unload()
            vlm.lora_merged = True
    vlm.run_dir = run
    vlm.calibration = _load_calibration(run)
    vlm.weights_hash = hash_weight_files(run)  # what reports and run dirs record as provenance
    return vlm.eval()


def _load_calibration(run: Path) -> Any:
    """The run's calibration.json (``pathvlm calibrate``), or None: scores are then uncalibrated."""
    from pathvlm.calibration import FILE_NAME, load_calibration

    path = run / FILE_NAME
    if not path.is_file():
        log.info("%s: no %s; image-decided report fields stay uncalibrated", run, FILE_NAME)
        return None
    return load_calibration(path)


def load_model(name_or_dir: str | Path, precision: str = "fp32", merge_lora: bool = True,
               device: str | Any | None = None) -> Any:
    """A PathVLM from a run directory or a registered name (see ``list_models``).

    ``precision``: ``fp32`` (default; what training starts from), or ``auto``/``bf16``/``fp16``
    for inference (`PathVLM.set_precision`). ``merge_lora``: fold a LoRA adapter into the LLM's
    weights (faster decoding; the model can then not be saved or trained further); False keeps
    the peft adapter, as training stages load it. ``device``: where the whole model runs (``cpu``,
    ``cuda``, ``cuda:1``); None: CUDA when available, else the CPU.
    """
    key = str(name_or_dir)
    run = _MODELS.get(key, Path(key).expanduser())
    if key in _MODELS and not (run / "config.yaml").is_file():
        raise ModelError(f"model {key!r}: weights not found at {run} (not in this checkout or "
                         "wheel); pass a run directory from `pathvlm train` instead")
    if not run.is_dir():
        raise ModelError(f"{key}: not a run directory or a registered model ({', '.join(list_models())})")
    if not (run / "config.yaml").is_file():
        raise ModelError(f"{run}: not a model run directory (no config.yaml)")
    from pathvlm.precision import default_device

    target = default_device(device)  # a bad name fails before the weights are read
    model = _load_run_dir(run, merge_lora)  # weights are read on the CPU
    if getattr(model.llm, "hf_quantizer", None) is None:
        model = model.to(target)
    else:  # bitsandbytes placed the quantised LLM itself: the other parts join it
        llm_device = join_llm_device(model)
        if device is not None and llm_device != target:
            log.warning("%s: the quantised LLM is on %s; the model runs there, not on %s", run, llm_device, target)
    return model.set_precision(precision)
