"""Answer the question asked: route it, then answer from the case, the rules, the scores or the LLM.

- case facts (slides, stains, parts, entered results) are copied from the case manifest, never
  read from pixels; no slide is encoded for them;
- out-of-scope questions (prognosis, treatment, identity, clinical data) get the refusal;
- classify and follow-ups read the differential the report reads (`morphologic_differential`
  of a lymphoma draft from the same input and case), so the chat's top entity is the report's;
- next steps come from the marker rules for the current top two entities;
- closed questions (multiple choice, yes/no) whose options are classes the model scores are
  decided by those scores, in the trained answer form (name, then letter or yes/no), so a
  closed answer never contradicts the differential and does not depend on the option order;
- describe, region, adequacy and other questions (and closed ones about anything else) go to
  the model (`Reply.text` None).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pathvlm.chat.router import Route, route_question
from pathvlm.data import dialogue as dlg
from pathvlm.data.classes import ClassInfo, load_class_set

log = logging.getLogger(__name__)

LYMPHOMA_WORDS = re.compile(r"lymphom|leuk[a]?emia|hodgkin|\b(cll|sll|fl|mcl|dlbcl|chl)\b",
                            re.IGNORECASE)
# a question that asks for the colorectal tissue class keeps the tissue domain even on lymphoid tiles
TISSUE_WORDS = re.compile(r"\b(colorectal|colonic|rectal)\b|\btissue (category|class|type)", re.IGNORECASE)
LYMPHOID_TISSUE = ("LYM",)  # tissue classes whose fields call for the lymphoma differential


@dataclass
class ChatConfig:
    """How routed answers are made.

    Attributes:
        domain: "lymphoma" (the report's lymphoma differential), "tissue" (colorectal tissue
            classes) or "auto" (lymphoma when the question, the case or a lymphoid field says so).
        shown: entities a differential answer lists.
    """

    domain: str = "auto"
    shown: int = 3


@dataclass
class Reply:
    """A routed answer; `text` None means: let the model generate."""

    route: Route
    text: str | None = None
    domain: str | None = None
    differential: list[tuple[str, float]] = field(default_factory=list)  # (entity or class, probability)


def _case_of(input: Any, case: Any) -> Any:
    """The pydantic Case behind `input`/`case`, or None."""
    from pathvlm.case import Case, load_case
    from pathvlm.model.inputs import CASE_SUFFIXES

    if isinstance(case, Case):
        return case
    if isinstance(input, Case):
        return input
    if case is None and isinstance(input, (str, Path)) and Path(input).suffix.lower() in CASE_SUFFIXES:
        return load_case(input)
    return None


def case_facts(input: Any, case: Any = None) -> dlg.CaseFacts:
    """What the case says, without reading pixels: a Case, a manifest, the app's slide inputs
    (name, stain, part) or a single file; `case` (Case or CaseFacts) wins over `input`."""
    if isinstance(case, dlg.CaseFacts):
        return case
    real = _case_of(input, case)
    if real is not None:
        return dlg.CaseFacts.from_case(real)
    items = input if isinstance(input, (list, tuple)) else [input]
    slides = []
    for i, item in enumerate(items):
        name = getattr(item, "name", None) or (Path(item).stem if isinstance(item, (str, Path)) else None)
        slides.append(dlg.SlideFact(name or f"input{i + 1}", getattr(item, "stain", None) or "H&E",
                                    getattr(item, "part", None)))
    return dlg.CaseFacts(slides)


def _input_key(source: Any) -> tuple | None:
    """A key that changes when the files change: paths with size and mtime (None: do not cache)."""
    from pathvlm.case import Case

    refs = [(r.path, r.stain, r.part, r.mpp) for r in source.slides] if isinstance(source, Case) else \
        [(source, None, None, None)] if isinstance(source, (str, Path)) else None
    if not refs:
        return None
    try:
        return tuple((str(p), Path(p).stat().st_size, Path(p).stat().st_mtime_ns, stain, part, mpp)
                     for p, stain, part, mpp in refs)
    except OSError:
        return None


class ChatAssistant:
    """Routes questions for one PathVLM; the report drafter (prompt encodings) is built once."""

    def __init__(self, model: Any, cfg: ChatConfig | None = None):
        self.model, self.cfg = model, cfg or ChatConfig()
        self._resolved: dict[tuple, list[Any]] = {}  # the last input's encoded slides

    @cached_property
    def findings_config(self) -> Any:
        """Report findings without LLM fields or narrative: only the scores the differential needs."""
        from pathvlm.reports.from_model import FindingsConfig

        wanted = {"constrained": False, "llm_fields": False, "narrative_tokens": 0}
        return FindingsConfig(**{k: v for k, v in wanted.items() if k in FindingsConfig.__dataclass_fields__})

    @cached_property
    def class_info(self) -> dict[str, ClassInfo]:
        """Entity names and tissue labels -> their class-file entry (features, next steps)."""
        from pathvlm.resources import resource_file

        out: dict[str, ClassInfo] = {}
        for name in ("lymphoma", "crc_tissue"):
            for info in load_class_set(resource_file("classes", name)).classes:
                out[dlg.entity_of(info.label) or info.label] = info
        return out

    # -- scores -----------------------------------------------------------------------------
    def scores(self, input: Any, case: Any = None, question: str = "",
               history: list[dict[str, str]] | None = None,
               mpp: float | None = None, domain: str | None = None) -> tuple[str, list[tuple[str, float]]]:
        """(domain, ranked (name, probability)): the lymphoma report's morphologic differential
        for the same input and case, or the colorectal tissue head of `pathvlm.scoring`. Empty
        when the model cannot score images (no text tower). ``domain`` ("lymphoma"/"tissue")
        overrides the one the question, the case and the scores decide."""
        from pathvlm.model.inputs import resolve_inputs, scale_notes
        from pathvlm.scoring import get_scorer
        from pathvlm.slide import TileConfig

        scorer = get_scorer(self.model)
        if scorer.unavailable:
            return "none", []
        m, real = self.model, _case_of(input, case)
        # the app passes its already encoded slides with the case: score those, not the paths
        source = real if real is not None and not isinstance(input, (list, tuple)) else input
        key = _input_key(source)
        key = key and (key, mpp)
        slides = self._resolved.get(key) if key else None
        if slides is None:  # mpp: a plain image's own pixel size
            slides = resolve_inputs(source, m.encoder, m.transform, TileConfig(mpp=m.cfg.tile_mpp, size=m.cfg.tile_size),
                                    mpp)
            if key:  # follow-ups on the same slides do not encode them again
                self._resolved = {key: slides}
        import torch

        with torch.no_grad():  # the app shows the tiles an answer drew on: this input's attention
            m.slide_embeddings(slides)
        m.last_notes = scale_notes(slides)
        scored: list[Any] = []
        # a follow-up stays in the domain of the conversation it follows
        said = " ".join([question, *(t.get("content", "") for t in history or ())])
        domain = domain or self._domain(said, real, case)
        if domain == "auto":
            scored = scorer.score_slides(slides)
            domain = "lymphoma" if self._lymphoid(scored) else "tissue"
        if domain == "lymphoma":
            report = m.draft_report(slides, "lymphoma", case=real, findings_config=self.findings_config)
            return domain, [(d.entity, float(d.probability)) for d in report.morphologic_differential]
        return domain, self._tissue(scored or scorer.score_slides(slides))

    def _domain(self, question: str, real: Any, case: Any) -> str:
        """The domain the question or the case settles, else "auto" (decided by the scores)."""
        if self.cfg.domain != "auto":
            return self.cfg.domain
        if LYMPHOMA_WORDS.search(question):
            return "lymphoma"
        if TISSUE_WORDS.search(question):
            return "tissue"
        facts = case if isinstance(case, dlg.CaseFacts) else dlg.CaseFacts.from_case(real) if real else None
        if facts is not None:
            from pathvlm.reports.ancillary import RULE_TARGETS

            if any(r.target in RULE_TARGETS for r in facts.results) or \
                    str(facts.clinical.get("specimen_type", "")).startswith("Lymph node"):
                return "lymphoma"
        return "auto"

    def _lymphoid(self, scored: list[Any]) -> bool:
        """Whether the scores put the input in the lymphoma domain: the lymphoma prompts outscore
        every colorectal tissue prompt on an H&E slide (one zero-shot over both prompt sets: the
        pooled logits share the text tower's scale; the margin averaged over the H&E slides, as the
        tissue classes are), or its leading tissue class is lymphoid.
        Measured on the train split with the shipped encoder: the joint zero-shot calls 191 of 191
        lymphoma images lymphoid and 0 of 266 CRC tiles; the leading tissue class alone called 42%
        of the lymphoma images lymphoid (they are not colorectal tissue, and the never-trained
        debris class absorbs them)."""
        tissue = self._tissue(scored)
        if tissue and tissue[0][0] in LYMPHOID_TISSUE:
            return True
        margins = [s.heads["lymphoma_entity"].logits.max() - s.heads["crc_tissue"].logits.max()
                   for s in scored if s.is_he and "lymphoma_entity" in s.heads and "crc_tissue" in s.heads]
        return bool(margins) and float(sum(margins)) / len(margins) > 0

    @staticmethod
    def _tissue(scored: list[Any]) -> list[tuple[str, float]]:
        """Colorectal tissue classes, probabilities averaged over the H&E slides, best first."""
        import numpy as np

        rows = [s.heads["crc_tissue"] for s in scored if s.is_he and "crc_tissue" in s.heads]
        if not rows:
            return []
        mean = np.mean([r.probs for r in rows], axis=0)
        return [(rows[0].classes[i], float(mean[i])) for i in np.argsort(-mean, kind="stable")]

    # -- answers ----------------------------------------------------------------------------
    def _name(self, key: str, domain: str) -> str:
        info = self.class_info.get(key)
        return key if domain == "lymphoma" or info is None else info.name

    def _features(self, key: str) -> dict[str, str]:
        info = self.class_info.get(key)
        return dict(info.features) if info else {}

    def _differential_text(self, domain: str, ranked: list[tuple[str, float]], facts: dlg.CaseFacts) -> str:
        shown = [(self._name(k, domain), p) for k, p in ranked[: self.cfg.shown]]
        top = ranked[0][0]
        if domain == "lymphoma":
            from pathvlm.reports.tables import ENTITY_PANELS

            text = dlg.differential_answer(shown, ", ".join(ENTITY_PANELS.get(top, ())) or None)
            if facts.results:
                text += f" Entered results taken into account: {'; '.join(r.text() for r in facts.results)}."
            return text
        return dlg.differential_answer(shown, None)

    def _next_steps(self, domain: str, ranked: list[tuple[str, float]], facts: dlg.CaseFacts) -> str:
        if domain == "lymphoma":
            return dlg.next_steps_answer([k for k, _ in ranked[:2]], facts.results)
        info = self.class_info.get(ranked[0][0]) if ranked else None
        tests = (info.next_steps or (f"confirm with {info.confirm}" if info.confirm else None)) if info else None
        return dlg.next_steps_answer([], facts.results, fallback=tests)

    def _key_for(self, asked: str, domain: str, keys: list[str]) -> str | None:
        if domain == "lymphoma":
            return dlg.entity_of(asked)
        want = asked.casefold()
        for k in keys:
            info = self.class_info.get(k)
            names = {k.casefold()} | ({info.name.casefold(), *(s.casefold() for s in info.synonyms)} if info else set())
            if want in names:
                return k
        return None

    @cached_property
    def _tissue_names(self) -> dict[str, str]:
        """Folded names of the colorectal tissue classes (class file names, synonyms, prompt-set
        names, keys) -> class key."""
        from pathvlm.resources import resource_file
        from pathvlm.zeroshot import make_prompt_set

        out: dict[str, str] = {}
        for info in load_class_set(resource_file("classes", "crc_tissue")).classes:
            for name in (info.label, info.name, *info.synonyms):
                out.setdefault(dlg._fold(name), info.label)
        for key, names in make_prompt_set(resource_file("prompts", "crc_tissue")).classes.items():
            for name in (key, *names):
                out.setdefault(dlg._fold(name), key)
        return out

    def _option_key(self, text: str, domain: str) -> str | None:
        if domain == "lymphoma":
            return dlg.entity_of(text)
        return self._tissue_names.get(dlg._fold(text))

    def _closed(self, input: Any, question: str, history: list[dict[str, str]] | None, case: Any,
                mpp: float | None) -> Reply | None:
        """A multiple-choice or yes/no question about classes the model scores, decided by the
        scores; None when its options are not such classes (the LLM answers it)."""
        from pathvlm.data.questions import closed_options, mc_answer, yesno_answer, yesno_subject

        options = closed_options(question)
        subject = None if options else yesno_subject(question)
        asked = options or ([subject] if subject else [])
        for domain in ("tissue", "lymphoma"):
            keys = [self._option_key(a, domain) for a in asked]
            if keys and all(keys) and len(set(keys)) == len(keys):
                break
        else:
            return None
        domain, ranked = self.scores(input, case, question, history, mpp, domain=domain)
        prob = dict(ranked)
        if not ranked or any(k not in prob for k in keys):
            return None
        if options:
            best = max(range(len(options)), key=lambda i: prob[keys[i]])
            text = mc_answer(options[best], best)
        else:
            top = ranked[0][0]
            text = yesno_answer(subject if keys[0] == top else self._name(top, domain), subject)
        return Reply(Route("closed", "scores"), text, domain=domain, differential=ranked)

    def _why_not(self, asked: str, domain: str, ranked: list[tuple[str, float]]) -> str:
        keys = [k for k, _ in ranked]
        key = self._key_for(asked, domain, keys)
        names = ", ".join(self._name(k, domain) for k in keys[: self.cfg.shown])
        if key is None or key not in keys:
            return f"{asked} is not among the entities I score for this input ({names}); I cannot weigh it."
        top = keys[0]
        if key == top:
            return f"{self._name(top, domain)} is the most likely on this input ({ranked[0][1]:.0%}); " \
                   f"the differential is {names}."
        tests = None
        if domain == "lymphoma":
            rows = dlg.separating_tests(top, key)[:3]
            tests = ", ".join(f"{m} ({dlg._short(top)} {x}, {dlg._short(key)} {y})" for m, x, y in rows) or None
        return dlg.why_not_answer(self._name(key, domain), self._name(top, domain), self._features(key), tests)

    def reply(self, input: Any, question: str, history: list[dict[str, str]] | None = None,
              case: Any = None, mpp: float | None = None) -> Reply:
        """Route `question` and answer it where the case, the rules or the scores decide."""
        facts = case_facts(input, case)
        route = route_question(question, history, [s.name for s in facts.slides])
        if route.kind == "facts":
            kind = route.detail or "slides"
            return Reply(route, dlg.fact_answer(kind, facts, marker=route.marker, slide=route.slide))
        if route.kind == "out_of_scope":
            return Reply(route, dlg.refusal(route.detail or "clinical"))
        if route.kind == "closed":
            return self._closed(input, question, history, case, mpp) or Reply(route)
        if route.kind not in ("classify", "next_steps", "followup"):
            return Reply(route)
        domain, ranked = self.scores(input, case, question, history, mpp)
        if not ranked:  # no text tower: the LLM answers on its own
            return Reply(route, domain=domain)
        reply = Reply(route, domain=domain, differential=ranked)
        if route.kind == "classify":
            reply.text = self._differential_text(domain, ranked, facts)
        elif route.kind == "next_steps":
            reply.text = self._next_steps(domain, ranked, facts)
        elif route.detail == "second" and len(ranked) > 1:
            second, top = ranked[1][0], ranked[0][0]
            reply.text = dlg.second_answer(self._name(second, domain), self._name(top, domain),
                                           self._features(second), ranked[1][1])
        elif route.detail == "why_not":
            reply.text = self._why_not(route.asked or "", domain, ranked)
        return reply
