"""Greedy decoding of Llama-family LLMs in a lean loop: the same tokens as `generate`, less overhead.

On a 2-core CPU the decode of a 135M-parameter LLM spends about a third of every token outside its
matrix products: ~60 small tensor ops and Python module calls per layer, logits processors and
causal-mask building in `transformers`' `generate` (profiled in README "Precision"). That overhead
is the same in fp32 and bf16, so it also caps what bf16 gains. `GreedyDecoder` runs the prompt
through the model's own forward (its KV cache, its rotary embedding), then decodes token by token
with the layer weights read from the model: q/k/v and gate/up each as one matrix product, the KV
cache preallocated, the next token the argmax of the last position's logits. The arithmetic is the
model's, op for op (RMSNorm statistics in fp32, rotary in the weights' dtype), so the tokens are
`generate`'s; `tests/test_fast_decode.py` checks that on a random Llama and on SmolLM2 in fp32
and bf16. Anything else (sampling, a repetition penalty, a quantised or LoRA-wrapped LLM, another
architecture) goes to `generate` (`unsupported` says why).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# generate() options the lean loop implements; any other option (or value) falls back to generate
_GREEDY_DEFAULTS = {"do_sample": False, "repetition_penalty": 1.0, "num_beams": 1}
_HANDLED = {"inputs_embeds", "attention_mask", "pad_token_id", "max_new_tokens", "min_new_tokens",
            "streamer", *_GREEDY_DEFAULTS}
_ONE_IS_OFF = {"num_beam_groups", "num_return_sequences", "guidance_scale"}
# generation-config fields that add a logits processor, change the search or stopping: each must
# hold transformers' default (compared with a fresh GenerationConfig), else generate decodes
_CONFIG_FIELDS = ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                  "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "encoder_no_repeat_ngram_size",
                  "exponential_decay_length_penalty", "stop_strings", "max_time", "min_length",
                  "watermarking_config", "token_healing", "guidance_scale", "renormalize_logits",
                  "remove_invalid_values", "cache_implementation", "prompt_lookup_num_tokens", "num_beam_groups",
                  "diversity_penalty", "num_return_sequences", "low_memory", "penalty_alpha", "dola_layers")


def unsupported(llm: Any) -> str | None:
    """Why `GreedyDecoder` cannot run ``llm`` (None: it can)."""
    cfg = getattr(llm, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        return f"model type {getattr(cfg, 'model_type', type(llm).__name__)!r} (llama only)"
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "non-standard llama MLP"
    inner = getattr(llm, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not isinstance(getattr(llm, "lm_head", None), nn.Linear):
        return "no model.layers / lm_head (wrapped model)"
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            if type(lin) is not nn.Linear or lin.bias is not None:  # LoRA, bitsandbytes, bias
                return f"{type(lin).__name__} projection (plain bias-free nn.Linear only)"
    if getattr(cfg, "_attn_implementation", "sdpa") != "sdpa":
        return f"attention {cfg._attn_implementation!r} (sdpa only)"
    if (getattr(cfg, "rope_scaling", None) or {}).get("rope_type", "default") in ("dynamic", "longrope"):
        return "position-dependent rope scaling"
    if "logits_to_keep" not in inspect.signature(llm.forward).parameters:
        return "transformers older than 4.50 (no logits_to_keep)"
    return config_unsupported(getattr(llm, "generation_config", None))


def config_unsupported(gc: Any) -> str | None:
    """Why ``gc`` (an LLM's generation_config, which generate applies by default) needs generate."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    for name in _CONFIG_FIELDS:
        value = getattr(gc, name, None)
        off = value in (None, 0, False, "", [], ()) or (value == 1 and name in _ONE_IS_OFF)
        if gc is not None and not off and value != getattr(default, name, None):
            return f"generation_config.{name} = {value!r}"
    return None


def call_unsupported(kwargs: dict[str, Any], generation_config: Any = None) -> str | None:
    """Why a `generate(**kwargs)` call needs `generate` itself (None: the lean loop gives its tokens).
    An option the call leaves out takes the LLM's ``generation_config`` value, as in generate."""
    extra = set(kwargs) - _HANDLED
    if extra:
        return f"generate option(s) {sorted(extra)}"
    for key, value in _GREEDY_DEFAULTS.items():
        given = kwargs[key] if key in kwargs else getattr(generation_config, key, None)
        if given is not None and given != value:  # None: unset (transformers 5 leaves defaults None)
            return f"{key}={given!r}"
    if int(kwargs.get("max_new_tokens") or 0) < 1:
        return "no max_new_tokens"
    embeds, mask = kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
    if embeds is None or embeds.dim() != 3 or embeds.shape[0] != 1:
        return "not one sequence of inputs_embeds"
    if mask is not None and not bool(mask.all()):
        return "padded attention mask"
    return None


class GreedyDecoder:
    """The lean greedy loop over one Llama-family LLM (see the module docstring).

    Built from the LLM's current weights (q/k/v and gate/up concatenated once); `stale` says when
    they changed (cast to another precision, trained) so the caller builds a new one.
    """

    def __init__(self, llm: Any):
        reason = unsupported(llm)
        if reason:
            raise ValueError(f"GreedyDecoder: {reason}")
        cfg = llm.config
        self.llm = llm
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # transformers 5.2x names the KV-cache argument `cache` (`past_key_values` deprecated); older ones the latter
        self._cache_arg = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"
        self.layers = []
        with torch.no_grad():
            for layer in llm.model.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append({
                    "norm1": layer.input_layernorm, "norm2": layer.post_attention_layernorm,
                    "qkv": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                    "o": a.o_proj.weight, "gate_up": torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                    "down": m.down_proj.weight, "inter": m.gate_proj.weight.shape[0]})
        self._key = self._weights_key()

    def _weights_key(self) -> tuple:
        """Where every weight the loop copies or reads lives, and its in-place version: a cast, a
        reload or an optimizer step changes it. (An edit through ``.data`` bumps no version: after
        one, set the owner's ``_decoder`` to None.)"""
        weights = [self.llm.lm_head.weight]
        for layer in self.llm.model.layers:
            a, m = layer.self_attn, layer.mlp
            weights += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, m.gate_proj.weight, m.up_proj.weight]
        return (weights[0].dtype, *((w.data_ptr(), w._version) for w in weights))

    @property
    def stale(self) -> bool:
        return self._weights_key() != self._key

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm's arithmetic: statistics in fp32, scaled in the input's dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * xf.to(x.dtype)

    def _prefill(self, embeds: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt through the model's own forward -> (last logits, K, V) with K/V
        [layers, 1, kv_heads, total, head_dim] holding the prompt's cache."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.llm.config)
        except TypeError:  # transformers < 4.56
            cache = DynamicCache()
        out = self.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        n, p = len(self.layers), embeds.shape[1]
        dtype = self.layers[0]["o"].dtype
        k_buf = torch.empty(n, 1, self.n_kv, total, self.head_dim, dtype=dtype, device=embeds.device)
        v_buf = torch.empty_like(k_buf)
        for i in range(n):
            if hasattr(cache, "layers"):  # transformers >= 4.56
                keys, values = cache.layers[i].keys, cache.layers[i].values
            else:
                keys, values = cache.key_cache[i], cache.value_cache[i]
            k_buf[i, :, :, :p] = keys
            v_buf[i, :, :, :p] = values
        return out.logits[:, -1], k_buf, v_buf

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int, min_new_tokens: int | None = None,
                 streamer: Any = None, **_: Any) -> torch.Tensor:
        """New token ids [1, T], as ``generate(inputs_embeds=..., do_sample=False)`` returns them:
        stops after an end-of-sequence token (not before ``min_new_tokens``) or at
        ``max_new_tokens``."""
        llm = self.llm
        if min_new_tokens is None:  # as generate: the call's value, else the model's
            min_new_tokens = getattr(llm.generation_config, "min_new_tokens", None) or 0
        eos = llm.generation_config.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long,
                           device=inputs_embeds.device)
        p = inputs_embeds.shape[1]
        logits, k_buf, v_buf = self._prefill(inputs_embeds, p + max_new_tokens)
        embed, head = llm.model.get_input_embeddings().weight, llm.lm_head.weight
        positions = torch.arange(p, p + max_new_tokens, device=inputs_embeds.device)[None]
        cos, sin = llm.model.rotary_emb(embed[:1][None], positions)  # [1, T, head_dim], embed's dtype
        nq, nkv, hd, half = self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.head_dim, self.head_dim // 2
        out = []
        for t in range(max_new_tokens):
            if t < min_new_tokens and eos.numel():
                logits = logits.clone()
                logits[:, eos] = float("-inf")
            token = logits.float().argmax(-1)  # [1]
            out.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            if t + 1 == max_new_tokens or (eos.numel() and bool(torch.isin(token, eos))):
                break
            pos = p + t
            x = embed[token][None]  # [1, 1, hidden]
            c, s = cos[:, t : t + 1, None], sin[:, t : t + 1, None]  # [1, 1, 1, head_dim]
            for i, w in enumerate(self.layers):
                h = self._norm(w["norm1"], x)
                qk, v = F.linear(h, w["qkv"]).split([nq + nkv, nkv], -1)
                qk = qk.view(1, 1, -1, hd)  # q's heads then k's: one rotary for both
                qk = qk * c + torch.cat((-qk[..., half:], qk[..., :half]), -1) * s
                q, k = qk.split([self.n_heads, self.n_kv], 2)
                k_buf[i, :, :, pos] = k[:, 0]
                v_buf[i, :, :, pos] = v.view(1, -1, hd)
                a = F.scaled_dot_product_attention(q.transpose(1, 2), k_buf[i, :, :, : pos + 1],
                                                   v_buf[i, :, :, : pos + 1], enable_gqa=self.n_kv != self.n_heads)
                x = x + F.linear(a.transpose(1, 2).reshape(1, 1, -1), w["o"])
                gate, up = F.linear(self._norm(w["norm2"], x), w["gate_up"]).split(w["inter"], -1)
                x = x + F.linear(F.silu(gate) * up, w["down"])
            logits = F.linear(self._norm(llm.model.norm, x)[:, -1], head)
        if streamer is not None:
            streamer.end()
        return torch.stack(out, 1)
