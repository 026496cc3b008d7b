"""PathVLM: (encoder) -> aggregator -> projector -> LLM, asked about a slide, image or case.

Slide tokens replace ``<slide>`` placeholders via ``masked_scatter``; generation runs on
``inputs_embeds`` so the placeholder id never reaches the LLM's embedding table.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathvlm.errors import ModelError
from pathvlm.features import check_same_encoder
from pathvlm.model.aggregators import create_aggregator
from pathvlm.model.inputs import SlideInput, resolve_inputs, scale_notes
from pathvlm.model.processor import SlideSlot, add_slide_token, build_messages, render
from pathvlm.model.projectors import create_projector

log = logging.getLogger(__name__)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0


@dataclass
class ModelConfig:
    """Everything needed to rebuild a PathVLM (weights come from the run directory).

    Attributes:
        encoder: ``create_encoder`` name, or None when the model only reads cached features.
        feature_dim: patch feature width; required when ``encoder`` is None.
        n_tokens: K, slide tokens per slide (aggregator queries / attention branches).
        max_case_tokens: visual-token budget per question; a case of S slides gets
            ``min(K, max(1, budget // S))`` tokens per slide (K tokens average-pooled down).
        llm: ``load_llm`` source; ``llm_config``: LlamaConfig kwargs for a from-scratch LLM
            (tiny test models) that is then saved in the run directory under ``llm/``.
        system_prompt: None keeps the chat template's own default.
        tile_mpp, tile_size: how a whole slide is cut for the encoder (um/px and pixels per tile
            side); they should match the scale the encoder was trained at.
    """

    encoder: str | None = None
    feature_dim: int | None = None
    aggregator: str = "abmil"
    n_tokens: int = 8
    hidden_dim: int = 256
    dropout: float = 0.0
    projector: str = "mlp2x_gelu"
    llm: str = "smollm2"
    llm_config: dict[str, Any] | None = None
    quantization: str | None = None
    max_case_tokens: int = 64
    system_prompt: str | None = None
    tile_mpp: float = 0.5
    tile_size: int = 224
    generation: GenerationConfig = field(default_factory=GenerationConfig)


class PathVLM(nn.Module):
    """Vision-language model over slide feature bags."""

    def __init__(self, cfg: ModelConfig, aggregator: nn.Module, projector: nn.Module, llm: Any,
                 tokenizer: Any, encoder: nn.Module | None = None, transform: Any = None):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.transform = encoder, transform
        self.aggregator, self.projector, self.llm, self.tokenizer = aggregator, projector, llm, tokenizer
        self.slide_token_id = add_slide_token(tokenizer)
        self.last_attention: list[dict[str, Any]] = []  # per slide of the last call, for the app
        self.run_dir: Path | None = None  # set by load_model
        self.calibration: Any = None  # pathvlm.calibration.Calibration from calibration.json
        self.precision = "fp32"  # of the LLM (the encoder has its own); see set_precision
        self.lora_merged = False  # load_model folded a LoRA adapter into the LLM (inference only)
        self.last_notes: list[str] = []  # what the last call assumed (e.g. an image's pixel size)
        self.fast_decode = True  # greedy answers by `fast_decode.GreedyDecoder` where it applies
        self._decoder: Any = None
        self._decoder_lock = threading.Lock()

    def set_precision(self, precision: str) -> PathVLM:
        """Run the encoder's image tower and the LLM in ``precision`` (auto/fp32/bf16/fp16) for
        inference; returns self. The aggregator and projector stay fp32: ABMIL's softmax runs
        over up to 100k patches, where bf16's 8-bit mantissa flattens the attention. The LLM's
        weights are cast (faster on CPU than autocast, see README Precision); its RMSNorm keeps
        fp32 statistics itself. ``set_precision("fp32")`` restores the exact fp32 weights.
        ``auto`` keeps an encoder whose bf16 embeddings are not equal to fp32 (the demo's
        EfficientNet) in fp32 while the LLM runs in bf16; ``self.precision`` is the LLM's and
        ``self.encoder.precision`` the encoder's.
        """
        from pathvlm.precision import cast_module, resolve_precision

        if self.encoder is not None and hasattr(self.encoder, "set_precision"):
            self.encoder.set_precision(precision)  # the choice as given: `auto` may keep it fp32
        precision = resolve_precision(precision, self.device)
        if precision == self.precision:
            return self
        if getattr(self.llm, "hf_quantizer", None) is not None:  # bitsandbytes sets its own compute dtype
            log.info("LLM is quantised; precision %s applies to the encoder only", precision)
        else:
            cast_module(self.llm, precision, fp32_norms=False, cast_buffers=False)
        self.precision = precision
        return self

    # -- slide tokens ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def tokens_per_slide(self, n_slides: int) -> int:
        if n_slides == 0:
            return 0
        k = min(self.cfg.n_tokens, max(1, self.cfg.max_case_tokens // n_slides))
        if k * n_slides > self.cfg.max_case_tokens:
            log.warning("%d slides exceed the %d-token budget even at 1 token each", n_slides,
                        self.cfg.max_case_tokens)
        return k

    def slide_embeddings(self, slides: list[SlideInput]) -> tuple[torch.Tensor, list[SlideSlot]]:
        """Projected tokens of all slides, concatenated [T, llm_hidden], and their prompt slots.

        Also keeps each slide's attention in ``last_attention``.
        """
        k = self.tokens_per_slide(len(slides))
        embeds, slots, self.last_attention = [], [], []
        for s in slides:
            if self.encoder is not None:  # features of another encoder live in another space
                check_same_encoder(s.bag.attrs, self.encoder.name, self.encoder.weights_hash, s.source)
            feats = s.bag.features.to(self.device, torch.float32)
            if feats.dim() != 2 or feats.shape[1] != self.in_dim:
                raise ModelError(f"{s.source}: features have shape {tuple(feats.shape)}, the model expects "
                                 f"[N, {self.in_dim}]")
            tokens, attn = self.aggregator(feats[None], None)  # [1, K, H], [1, K, N]
            if k < tokens.shape[1]:  # budget: average neighbouring tokens down to k
                tokens = nn.functional.adaptive_avg_pool1d(tokens.transpose(1, 2), k).transpose(1, 2)
                attn = nn.functional.adaptive_avg_pool1d(attn.transpose(1, 2), k).transpose(1, 2)
            embeds.append(self.projector(tokens[0]))  # [k, llm_hidden]
            slots.append(SlideSlot(s.name, s.stain, s.part, k))
            self.last_attention.append({"name": s.name, "source": s.source, "coords": s.bag.coords,
                                        "attention": attn[0].detach().cpu()})
        if not embeds:
            return torch.zeros(0, self.llm_hidden, device=self.device), slots
        return torch.cat(embeds), slots

    def top_tiles(self, n: int = 5) -> list[dict[str, Any]]:
        """The ``n`` most attended patches of the last call over all its slides, as evidence:
        slide name, level-0 (x, y) and attention (mean over the slide's tokens)."""
        rows = []
        for a in self.last_attention:
            weights = a["attention"].mean(0) if a["attention"].numel() else a["attention"].new_zeros(0)
            for w, i in zip(*torch.topk(weights, min(n, weights.numel()))):
                rows.append({"slide": a["name"], "source": a["source"], "weight": float(w),
                             "xy": tuple(int(v) for v in a["coords"][i])})
        return sorted(rows, key=lambda r: -r["weight"])[:n]

    @property
    def in_dim(self) -> int:
        return int(self.encoder.embed_dim) if self.encoder is not None else int(self.cfg.feature_dim)

    @property
    def llm_hidden(self) -> int:
        return int(self.llm.get_input_embeddings().weight.shape[1])

    def embed_inputs(self, input_ids: torch.Tensor, slide_embeds: torch.Tensor) -> torch.Tensor:
        """LLM input embeddings [B, L, H] with ``<slide>`` positions filled by slide_embeds [T, H]."""
        is_slide = input_ids == self.slide_token_id
        n = int(is_slide.sum())
        if n != slide_embeds.shape[0]:
            raise ModelError(f"the prompt has {n} {self.tokenizer.convert_ids_to_tokens(self.slide_token_id)} "
                             f"placeholder tokens but {slide_embeds.shape[0]} slide tokens were computed")
        safe = input_ids.masked_fill(is_slide, 0)  # placeholder id may lie outside the LLM vocab
        embeds = self.llm.get_input_embeddings()(safe)
        if n == 0:
            return embeds
        mask = is_slide.unsqueeze(-1).expand_as(embeds)
        return embeds.masked_scatter(mask, slide_embeds.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, slide_embeds: torch.Tensor, **kwargs: Any) -> Any:
        return self.llm(inputs_embeds=self.embed_inputs(input_ids, slide_embeds), **kwargs)

    # -- chat -------------------------------------------------------------------------------
    def prepare(self, input: Any, question: str, history: list[dict[str, str]] | None = None,
                mpp: float | None = None) -> torch.Tensor:
        """Prompt embeddings [1, L, H] for a question about ``input`` (None: no slide).

        ``mpp``: um/px of a plain image (resampled to ``cfg.tile_mpp``); see `resolve_inputs`.
        """
        from pathvlm.slide import TileConfig

        tile = TileConfig(mpp=self.cfg.tile_mpp, size=self.cfg.tile_size)
        slides = resolve_inputs(input, self.encoder, self.transform, tile, mpp)
        self.last_notes = scale_notes(slides)
        slide_embeds, slots = self.slide_embeddings(slides)
        messages = build_messages(question, slots, history, self.cfg.system_prompt)
        ids = render(self.tokenizer, messages).to(self.device)
        return self.embed_inputs(ids, slide_embeds)

    def _gen_kwargs(self, embeds: torch.Tensor, gen: dict[str, Any]) -> dict[str, Any]:
        g = dict(vars(self.cfg.generation))
        unknown = set(gen) - set(g) - {"streamer", "min_new_tokens"}
        if unknown:
            raise ModelError(f"unknown generation option(s): {sorted(unknown)} (valid: {sorted(g)})")
        g.update(gen)
        if not g["do_sample"]:
            g.pop("temperature"), g.pop("top_p")
        pad = self.tokenizer.pad_token_id
        return {"inputs_embeds": embeds, "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                      device=embeds.device),
                "pad_token_id": pad if pad is not None else self.tokenizer.eos_token_id, **g}

    def run_generate(self, **kwargs: Any) -> torch.Tensor:
        """``self.llm.generate(**kwargs)`` (kwargs from `_gen_kwargs`): greedy decoding of a Llama-family
        LLM runs in `fast_decode.GreedyDecoder`'s lean loop, the same tokens with less overhead per
        token; sampling, penalties and other LLMs use ``generate``. ``self.fast_decode = False``
        always uses ``generate``."""
        from pathvlm.model import fast_decode

        why = "off" if not self.fast_decode else fast_decode.call_unsupported(kwargs, getattr(self.llm, "generation_config", None))
        why = why or fast_decode.unsupported(self.llm)  # every call: the LLM or its config may have changed
        if why is None:
            with self._decoder_lock:  # the app streams from a worker thread
                if self._decoder is None or self._decoder.llm is not self.llm or self._decoder.stale:
                    self._decoder = fast_decode.GreedyDecoder(self.llm)
                decoder = self._decoder
        if why is not None:
            log.debug("decoding with generate: %s", why)
            return self.llm.generate(**kwargs)
        return decoder.generate(**kwargs)

    @torch.no_grad()
    def generate_ids(self, input: Any, question: str, history: list[dict[str, str]] | None = None,
                     precision: str | None = None, mpp: float | None = None,
                     **gen: Any) -> torch.Tensor:
        """New token ids [1, T] of the answer (``precision``: see `set_precision`; None keeps it;
        ``mpp``: as in `ask`)."""
        if precision is not None:
            self.set_precision(precision)
        embeds = self.prepare(input, question, history, mpp)
        return self.run_generate(**self._gen_kwargs(embeds, gen))

    @property
    def chat(self) -> Any:
        """The question router (``pathvlm.chat.ChatAssistant``), built on first use."""
        if getattr(self, "_chat", None) is None:
            from pathvlm.chat import ChatAssistant

            self._chat = ChatAssistant(self)
        return self._chat

    def routed(self, input: Any, question: str, history: list[dict[str, str]] | None, case: Any,
               route: bool, mpp: float | None = None) -> str | None:
        """The routed answer (case facts, refusal, differential, next steps), or None when the LLM
        should answer. Text-only prompts (no input, no case) are never routed."""
        if not route or (input is None and case is None):
            return None
        self.last_notes = []
        reply = self.chat.reply(input, question, history, case, mpp=mpp)
        if reply.text is not None and reply.route.kind in ("facts", "out_of_scope"):
            self.last_attention = []  # nothing was looked at
        return reply.text

    def ask(self, input: Any, question: str, history: list[dict[str, str]] | None = None, *,
            case: Any = None, route: bool = True, precision: str | None = None,
            mpp: float | None = None, **gen: Any) -> str:
        """Answer ``question`` about a slide / image / feature file / case (None: text only).

        Args:
            case: the case (``pathvlm.case.Case`` or ``pathvlm.data.dialogue.CaseFacts``) whose
                slides and entered results case-fact questions are answered from.
            route: answer case facts, out-of-scope, differential and next-steps questions by
                ``pathvlm.chat`` (False: always the LLM).
            precision: ``auto``/``fp32``/``bf16``/``fp16`` from now on (`set_precision`); None
                keeps the model's current one.
            mpp: the image's own um/px; without it a plain image is taken to be at the model's
                tile scale and ``last_notes`` says so.
        """
        if precision is not None:
            self.set_precision(precision)
        text = self.routed(input, question, history, case, route, mpp)
        if text is not None:
            return text
        out = self.generate_ids(input, question, history, mpp=mpp, **gen)
        return self.tokenizer.decode(out[0], skip_special_tokens=True).strip()

    def stream(self, input: Any, question: str, history: list[dict[str, str]] | None = None, *,
               case: Any = None, route: bool = True, precision: str | None = None,
               mpp: float | None = None, **gen: Any) -> Iterator[str]:
        """Yield the answer in text pieces as they are generated (a routed answer word by word;
        ``precision`` and ``mpp`` as in `ask`)."""
        from transformers import TextIteratorStreamer

        if precision is not None:
            self.set_precision(precision)
        text = self.routed(input, question, history, case, route, mpp)
        if text is not None:
            yield from re.findall(r"\S+\s*", text)
            return
        with torch.no_grad():
            embeds = self.prepare(input, question, history, mpp)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=False, skip_special_tokens=True)
        kwargs = self._gen_kwargs(embeds, {**gen, "streamer": streamer})
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.run_generate(**kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure is re-raised in the caller's thread
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from (piece for piece in streamer if piece)
        thread.join()
        if errors:
            raise errors[0]

    def draft_report(self, input: Any, kind: str, clinical: dict[str, Any] | None = None,
                     case: Any = None, findings_config: Any = None,
                     min_confidence: float | None = None, mpp: float | None = None) -> Any:
        """A draft structured report (``pathvlm.reports``) of a slide, image, features or case;
        ``findings_config``: a ``pathvlm.reports.from_model.FindingsConfig``; ``min_confidence``:
        threshold for image-decided values (None: the one chosen on val, calibration.json);
        ``mpp``: a plain image's um/px (the report's flags say which scale was assumed without it)."""
        from pathvlm.reports.from_model import ReportDrafter

        return ReportDrafter(self, findings_config).draft(input, kind, clinical, case,
                                                          min_confidence=min_confidence, mpp=mpp)

    # -- persistence ------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> Path:
        from pathvlm.model.loading import save_model_dir

        return save_model_dir(self, Path(out_dir))


def build_model(cfg: ModelConfig, llm: tuple[Any, Any] | None = None) -> PathVLM:
    """Assemble a PathVLM from a config (fresh aggregator/projector weights).

    Args:
        llm: an already loaded ``(model, tokenizer)``; otherwise from ``cfg.llm`` / ``cfg.llm_config``.
    """
    encoder = transform = None
    if cfg.encoder:
        from pathvlm.encoders import create_encoder

        encoder, transform = create_encoder(cfg.encoder, device="cpu")  # the model moves as one (load_model)
        in_dim = int(encoder.embed_dim)
    elif cfg.feature_dim:
        in_dim = int(cfg.feature_dim)
    else:
        raise ModelError("model config needs an encoder name or feature_dim")
    if llm is None:
        from pathvlm.model.llm import build_llm

        llm = build_llm(cfg)
    model, tok = llm
    hidden = int(model.get_input_embeddings().weight.shape[1])
    aggregator = create_aggregator(cfg.aggregator, in_dim=in_dim, hidden_dim=cfg.hidden_dim,
                                   n_tokens=cfg.n_tokens, dropout=cfg.dropout)
    projector = create_projector(cfg.projector, cfg.hidden_dim, hidden)
    vlm = PathVLM(cfg, aggregator, projector, model, tok, encoder, transform)
    return vlm.eval()
