"""Image findings from a PathVLM: calibrated zero-shot heads, per-value evidence tiles, LLM.

Per slide `pathvlm.scoring` gives calibrated probabilities of each head (lymphoma entity,
colorectal tissue class per tile, carcinoma present, tumour in a node) and per-tile scores; the
tiles that most support a value are that value's evidence. Fields no calibrated head decides
abstain; with `llm_fields` the LLM ranks their allowed values (constrained decoding) and the
report lists that ranking, marked uncalibrated, without filling the field. Drafting
(`pathvlm.reports.draft`) decides what may fill what, at the threshold in force.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pathvlm.provenance import model_weights_hash
from pathvlm.reports.fields import FieldSpec
from pathvlm.reports.findings import ImageFindings, Proposal, SlideFindings

if TYPE_CHECKING:
    from pathvlm.case import Case
    from pathvlm.reports.schemas import ReportBase
    from pathvlm.scoring import HeadScores, Scorer

log = logging.getLogger(__name__)


@dataclass
class FindingsConfig:
    """How findings are taken from the model.

    Attributes:
        n_top_tiles: attention tiles kept per slide.
        n_class_tiles: evidence tiles kept per value.
        llm_fields: let the LLM rank the allowed values of fields without a calibrated head
            (they still abstain; the report lists the ranking as uncalibrated). Costs about
            one LLM forward per field.
        free_text_tokens: with llm_fields, answer length for fields without an enumeration.
        narrative_tokens: LLM narrative length (0: the deterministic template). LLM prose is
            used only when it passes `narrative.check_prose`.
        min_confidence: threshold in force (None: the one chosen on val in the calibration).
    """

    n_top_tiles: int = 8
    n_class_tiles: int = 4
    llm_fields: bool = False
    free_text_tokens: int = 12
    narrative_tokens: int = 0
    min_confidence: float | None = None


def _top_coords(coords: np.ndarray, scores: np.ndarray, n: int) -> list[tuple[int, int]]:
    order = np.argsort(-scores, kind="stable")[:n]
    return [(int(coords[i][0]), int(coords[i][1])) for i in order]


def _support_tiles(h: HeadScores, coords: np.ndarray, n: int) -> dict[str, list[tuple[int, int]]]:
    """Per class, the tiles that most support it over every other class (probability margin),
    so two values of one slide cite different tiles wherever the slide has them."""
    if not len(h.tile_probs):
        return {}
    out = {}
    probs = h.tile_probs  # [N, C]
    for c, name in enumerate(h.classes):
        if h.classes == ["absent", "present"] and name == "absent":
            continue
        rest = np.delete(probs, c, axis=1).max(1) if probs.shape[1] > 1 else 0.0
        out[name] = _top_coords(coords, probs[:, c] - rest, n)
    return out


def slide_findings(scores: Any, n_tiles: int) -> SlideFindings:
    """SlideFindings of one slide's `pathvlm.scoring.SlideScores`."""
    out = SlideFindings(scores.name, scores.stain or "H&E")
    coords = scores.coords
    for name, h in scores.heads.items():
        out.heads[name] = {c: float(p) for c, p in zip(h.classes, h.probs)}
        out.head_tiles[name] = _support_tiles(h, coords, n_tiles)
    tissue = scores.heads.get("crc_tissue")
    if tissue is not None and len(tissue.tile_probs):
        top = tissue.tile_probs.argmax(1)
        out.tile_top = [(tissue.classes[i], float(tissue.tile_probs[k, i]))
                        for k, i in enumerate(top)]
        for c, name in enumerate(tissue.classes):
            out.tissue_fractions[name] = float((top == c).mean())
        out.class_tiles.update(out.head_tiles["crc_tissue"])
    entity = scores.heads.get("lymphoma_entity")
    if entity is not None:
        out.entity_probs = dict(out.heads["lymphoma_entity"])
        for name, tiles in out.head_tiles["lymphoma_entity"].items():
            out.class_tiles.setdefault(name, tiles)
    return out


class ReportDrafter:
    """Draft reports with one PathVLM; its calibrated scorer is built once per model.

    Args:
        model: a PathVLM.
        cfg: a FindingsConfig.
        scorer: a `pathvlm.scoring.Scorer` (default: the model's own, with its calibration).
    """

    def __init__(self, model: Any, cfg: FindingsConfig | None = None,
                 scorer: Scorer | None = None):
        from pathvlm.scoring import get_scorer

        self.model, self.cfg = model, cfg or FindingsConfig()
        self.scorer = scorer or get_scorer(model)
        if self.scorer.unavailable:
            log.warning("%s; image fields abstain", self.scorer.unavailable)

    @property
    def no_zero_shot(self) -> str | None:
        return self.scorer.unavailable

    # -- findings ---------------------------------------------------------------------------
    def findings(self, input: Any, mpp: float | None = None) -> tuple[ImageFindings, list[Any]]:
        """ImageFindings of every slide in `input` and the resolved slide inputs (``mpp``: a
        plain image's um/px, as in `resolve_inputs`)."""
        from pathvlm.model.inputs import resolve_inputs
        from pathvlm.slide import TileConfig

        m = self.model
        tile = TileConfig(mpp=m.cfg.tile_mpp, size=m.cfg.tile_size)
        slides = resolve_inputs(input, m.encoder, m.transform, tile, mpp)
        found = [slide_findings(s, self.cfg.n_class_tiles)
                 for s in self.scorer.score_slides(slides)]
        chooser = None
        if slides:  # aggregator + projector only (milliseconds); sets the attention the app shows
            with torch.no_grad():
                embeds, slots = m.slide_embeddings(slides)
            for out, att in zip(found, m.last_attention):
                weights = att["attention"].float().mean(0).numpy() if att["attention"].numel() else None
                if weights is not None and weights.size:
                    out.top_tiles = _top_coords(np.asarray(att["coords"]), weights,
                                                self.cfg.n_top_tiles)
            if self.cfg.llm_fields:
                chooser = _LLMChooser(m, embeds, slots, self.cfg)
        status = self.scorer.status()
        threshold = status["min_confidence"] if status["calibrated"] else None
        return ImageFindings(found, choose=chooser, model=_model_name(m), min_confidence=threshold,
                             calibration=status, weights_hash=model_weights_hash(m)), slides

    def draft(self, input: Any, kind: str, clinical: Mapping[str, Any] | None = None,
              case: Case | None = None, min_confidence: float | None = None,
              mpp: float | None = None) -> ReportBase:
        """A draft report of type `kind` for a slide, image, feature file, case or case file.

        `min_confidence` overrides the threshold chosen on val (and `cfg.min_confidence`).
        ``mpp``: a plain image's um/px; without it the image is taken to be at the model's tile
        scale, and the report's flags say so."""
        from pathvlm.case import Case, load_case
        from pathvlm.model.inputs import CASE_SUFFIXES, scale_notes
        from pathvlm.reports.draft import draft_report

        if isinstance(input, (str, Path)) and Path(input).suffix.lower() in CASE_SUFFIXES:
            input = load_case(input)
        if isinstance(input, Case):
            case = case or input
        findings, slides = self.findings(input, mpp)
        narrator = None
        if self.cfg.narrative_tokens > 0:
            def narrator(prompt: str) -> str:
                return self.model.ask(None, prompt, max_new_tokens=self.cfg.narrative_tokens)
        threshold = min_confidence if min_confidence is not None else self.cfg.min_confidence
        report = draft_report(findings, kind, clinical, case=case, narrator=narrator,
                              min_confidence=threshold)
        notes = scale_notes(slides)
        report.flags.extend(notes)
        self.model.last_notes = notes  # as after `ask`: what this call assumed
        return report


def _model_name(model: Any) -> str:
    enc = getattr(model, "encoder", None)
    llm = getattr(model.cfg, "llm", "?") if not model.cfg.llm_config else "tiny-llm"
    return f"pathvlm({getattr(enc, 'name', 'features')}, {model.cfg.aggregator}, {llm})"


class _LLMChooser:
    """Constrained decoding: the option with the highest mean token log-likelihood wins.

    The slide tokens are computed once per draft; each question is one batched forward over all
    options (prompt + option, right-padded). The softmax over option scores says how the model
    ranks the allowed values, not how often it is right: it comes back as an uncalibrated
    Proposal, which drafting lists but never fills.
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
        out = m.run_generate(**m._gen_kwargs(embeds, {"max_new_tokens": self.cfg.free_text_tokens}))
        return m.tokenizer.decode(out[0], skip_special_tokens=True).strip()

    def __call__(self, spec: FieldSpec, question: str, options: list[str]) -> Any:
        if not options:  # numbers/strings: a short answer, shown but never filled
            return Proposal(self._free_text(question), None, calibrated=False,
                            note="LLM free-text answer, not calibrated")
        s = self.scores(question, options)
        p = np.exp(s - s.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        ranked = [(options[i], float(round(p[i], 4))) for i in order[:5]]
        return Proposal(ranked[0][0], None, ranked, calibrated=False,
                        note="LLM ranking of the allowed values (softmax of option "
                        "likelihoods), not calibrated")
