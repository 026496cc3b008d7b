"""Image findings from a PathVLM: zero-shot tile composition, attention evidence, LLM choices.

Per H&E slide the encoder's text tower scores every tile against the colorectal tissue prompts
(tissue fractions = share of tiles whose argmax is each class) and the lymphoma prompts (entity
probabilities, top-k pooled). Attention gives the top tiles. The LLM picks among a field's allowed
values by log-likelihood (constrained decoding), and writes the narrative from the filled fields.
Drafting (`pathvlm.reports.draft`) decides which of these a field may use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pathvlm.errors import ModelError
from pathvlm.provenance import model_weights_hash
from pathvlm.reports.fields import FieldSpec
from pathvlm.reports.findings import ImageFindings, SlideFindings
from pathvlm.resources import resolve_resource, resource_file

if TYPE_CHECKING:
    from pathvlm.case import Case
    from pathvlm.reports.schemas import ReportBase

log = logging.getLogger(__name__)


@dataclass
class FindingsConfig:
    """How findings are taken from the model.

    Attributes:
        tissue_prompts, entity_prompts: prompt files or packaged names (None: crc_tissue, lymphoma).
        top_k: tiles pooled per entity for the slide-level entity probabilities (MI-Zero).
        n_top_tiles: attention tiles kept per slide; n_class_tiles: tiles kept per class.
        constrained: let the LLM choose among allowed values for fields without a heuristic.
        free_text_tokens: answer length for fields without an enumeration (0: do not ask).
        narrative_tokens: LLM narrative length (0: the deterministic template).
    """

    tissue_prompts: str | Path | None = None
    entity_prompts: str | Path | None = None
    top_k: int = 10
    n_top_tiles: int = 8
    n_class_tiles: int = 4
    constrained: bool = True
    free_text_tokens: int = 12
    narrative_tokens: int = 160


def _prompt_file(given: str | Path | None, default: str) -> Path:
    # the default is always the packaged set, never a same-named file in the working directory
    return resolve_resource("prompts", given) if given else resource_file("prompts", default)


def _top_coords(coords: np.ndarray, scores: np.ndarray, n: int) -> list[tuple[int, int]]:
    order = np.argsort(-scores)[:n]
    return [(int(coords[i][0]), int(coords[i][1])) for i in order]


class ReportDrafter:
    """Draft reports with one PathVLM; text embeddings of the prompts are computed once.

    Args:
        model: a PathVLM.
        cfg: a FindingsConfig.
    """

    def __init__(self, model: Any, cfg: FindingsConfig | None = None):
        self.model, self.cfg = model, cfg or FindingsConfig()
        self.tissue = self.entities = None
        self.no_zero_shot: str | None = None
        encoder = getattr(model, "encoder", None)
        if encoder is None or not getattr(encoder, "has_text", False):
            what = "no patch encoder" if encoder is None else f"encoder {encoder.name} has no text tower"
            self.no_zero_shot = f"{what}: no zero-shot tissue composition or entity scores"
            log.warning("%s; image fields rely on the LLM only", self.no_zero_shot)
            return
        from pathvlm.zeroshot import ZeroShotClassifier

        self.tissue = ZeroShotClassifier(model, prompts=_prompt_file(self.cfg.tissue_prompts,
                                                                    "crc_tissue"),
                                         top_k=self.cfg.top_k, progress=False)
        self.entities = ZeroShotClassifier(model, prompts=_prompt_file(self.cfg.entity_prompts,
                                                                      "lymphoma"),
                                           top_k=self.cfg.top_k, progress=False)

    # -- findings ---------------------------------------------------------------------------
    def _zero_shot(self, s: Any, out: SlideFindings) -> None:
        if self.tissue is None or not out.is_he or s.bag.features.shape[0] == 0:
            return
        try:
            tissue = self.tissue.predict_features(s.bag)
            entities = self.entities.predict_features(s.bag)
        except ModelError as exc:  # features from another encoder: no zero-shot on this slide
            log.warning("%s: zero-shot skipped (%s)", s.source, exc)
            return
        probs = tissue.tile_probs  # [N, C]
        label = probs.argmax(axis=1)
        coords = np.asarray(tissue.coords)
        for c, name in enumerate(tissue.classes):
            out.tissue_fractions[name] = float((label == c).mean())
            mine = label == c
            if mine.any():
                out.class_tiles[name] = _top_coords(coords[mine], probs[mine, c],
                                                    self.cfg.n_class_tiles)
        eprobs, etiles = entities.probs, entities.tile_probs  # [E], [N, E]
        for e, name in enumerate(entities.classes):
            out.entity_probs[name] = float(eprobs[e])
            out.class_tiles.setdefault(name, _top_coords(coords, etiles[:, e],
                                                         self.cfg.n_class_tiles))

    def findings(self, input: Any) -> tuple[ImageFindings, list[Any]]:
        """ImageFindings of every slide in `input` and the resolved slide inputs."""
        from pathvlm.model.inputs import resolve_inputs
        from pathvlm.slide import TileConfig

        m = self.model
        tile = TileConfig(mpp=m.cfg.tile_mpp, size=m.cfg.tile_size)
        slides = resolve_inputs(input, m.encoder, m.transform, tile)
        with torch.no_grad():
            embeds, slots = m.slide_embeddings(slides)
        found = []
        for i, (s, att) in enumerate(zip(slides, m.last_attention)):
            name = s.name or f"input{i + 1}"
            out = SlideFindings(name, s.stain or "H&E")
            weights = att["attention"].float().mean(0).numpy() if att["attention"].numel() else None
            if weights is not None and weights.size:
                out.top_tiles = _top_coords(np.asarray(att["coords"]), weights,
                                            self.cfg.n_top_tiles)
            self._zero_shot(s, out)
            found.append(out)
        chooser = _LLMChooser(m, embeds, slots, self.cfg) if self.cfg.constrained and slides else None
        return ImageFindings(found, choose=chooser, model=_model_name(m),
                             weights_hash=model_weights_hash(m)), slides

    def draft(self, input: Any, kind: str, clinical: Mapping[str, Any] | None = None,
              case: Case | None = None) -> ReportBase:
        """A draft report of type `kind` for a slide, image, feature file, case or case file."""
        from pathvlm.case import Case, load_case
        from pathvlm.model.inputs import CASE_SUFFIXES
        from pathvlm.reports.draft import draft_report

        if isinstance(input, (str, Path)) and Path(input).suffix.lower() in CASE_SUFFIXES:
            input = load_case(input)
        if isinstance(input, Case):
            case = case or input
        findings, _ = self.findings(input)
        narrator = None
        if self.cfg.narrative_tokens > 0:
            def narrator(prompt: str) -> str:
                return self.model.ask(None, prompt, max_new_tokens=self.cfg.narrative_tokens)
        report = draft_report(findings, kind, clinical, case=case, narrator=narrator)
        if self.no_zero_shot:
            report.flags.append(self.no_zero_shot)
        return report


def _model_name(model: Any) -> str:
    enc = getattr(model, "encoder", None)
    llm = getattr(model.cfg, "llm", "?") if not model.cfg.llm_config else "tiny-llm"
    return f"pathvlm({getattr(enc, 'name', 'features')}, {model.cfg.aggregator}, {llm})"


class _LLMChooser:
    """Constrained decoding: the option with the highest mean token log-likelihood wins.

    The slide tokens are computed once per draft; each question is one batched forward over all
    options (prompt + option, right-padded). Confidence is the softmax over option scores, so
    it says how the model ranks the allowed values, not how often it is right.
    """

    def __init__(self, model: Any, embeds: torch.Tensor, slots: list[Any], cfg: FindingsConfig):
        self.model, self.embeds, self.slots, self.cfg = model, embeds, slots, cfg

    def _prompt_ids(self, question: str) -> torch.Tensor:
        from pathvlm.model.processor import build_messages, render

        text = f"{question}\nAnswer with one of the allowed values only."
        return render(self.model.tokenizer, build_messages(text, self.slots, None,
                                                           self.model.cfg.system_prompt))[0]

    @torch.no_grad()
    def scores(self, question: str, options: list[str]) -> np.ndarray:
        """Mean log-likelihood of each option [O] as the answer to `question`."""
        m, tok = self.model, self.model.tokenizer
        prompt = self._prompt_ids(question)  # [L]
        opt_ids = [tok(o, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
                   for o in options]
        width = len(prompt) + max(map(len, opt_ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(options), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, o in enumerate(opt_ids):
            n = len(prompt) + len(o)
            ids[i, :n] = torch.cat([prompt, torch.tensor(o)])
            mask[i, :n] = 1
        ids, mask = ids.to(m.device), mask.to(m.device)
        slide = self.embeds.repeat(len(options), 1)  # every row holds the same slide block
        # only the positions that predict option tokens need the vocabulary projection
        keep = width - len(prompt) + 1
        logits = m(ids, slide, attention_mask=mask, logits_to_keep=keep).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # [O, keep - 1, V]; t predicts t + 1
        out = []
        for i, o in enumerate(opt_ids):
            pos = torch.arange(0, len(o), device=m.device)
            target = torch.tensor(o, device=m.device)
            out.append(float(logp[i, pos, target].mean()))
        return np.asarray(out)

    @torch.no_grad()
    def _free_text(self, question: str) -> str | None:
        if self.cfg.free_text_tokens <= 0:
            return None
        m = self.model
        ids = self._prompt_ids(question)[None].to(m.device)
        embeds = m.embed_inputs(ids, self.embeds)
        out = m.llm.generate(**m._gen_kwargs(embeds, {"max_new_tokens": self.cfg.free_text_tokens}))
        return m.tokenizer.decode(out[0], skip_special_tokens=True).strip()

    def __call__(self, spec: FieldSpec, question: str, options: list[str]) -> Any:
        if not options:  # numbers/strings: a short answer that drafting validates or rejects
            return self._free_text(question)
        s = self.scores(question, options)
        p = np.exp(s - s.max())
        p /= p.sum()
        best = int(np.argmax(s))
        return options[best], float(round(p[best], 4))
