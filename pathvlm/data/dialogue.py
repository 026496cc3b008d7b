"""Chat question types and their answer forms, shared by the instruction builder, the chat router
and `pathvlm eval chat`.

Each type has its own form: a description names the aspect asked in the report's vocabulary, a
differential is ranked and hedged as the report is, next steps list the tests that separate the
top entities (from the marker rules in `pathvlm.reports.ancillary`), case facts are copied from
the case manifest, a refusal says what is missing. The builder trains on these forms and the
router writes them at inference, so what the model learns is what the router says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pathvlm.reports import ancillary
from pathvlm.reports.tables import ENTITY_ALIASES, ENTITY_PANELS

QUESTION_TYPES: dict[str, str] = {
    "describe": "morphology of the field in the report's vocabulary (model)",
    "classify": "ranked, hedged differential (the calibrated scores the report reads)",
    "next_steps": "stains and tests that separate the top entities (marker rules)",
    "facts": "slides, stains, parts, entered results (the case manifest, exactly)",
    "region": "the zoomed region (model)",
    "adequacy": "adequacy of the submitted tissue (model)",
    "out_of_scope": "prognosis, treatment, identity, clinical data: a short refusal",
    "followup": "a second question about the first answer",
}

ASPECTS = {"growth_pattern": "Growth pattern", "cell_size": "Predominant cell size",
           "cytology": "Cytologic features"}

QUESTIONS: dict[str, tuple[str, ...]] = {
    "describe": ("Describe this image.", "Describe the morphology you see.",
                 "Write a microscopic description of this field.", "What do you see on this slide?"),
    "growth_pattern": ("Describe the growth pattern in this image.", "What is the growth pattern?",
                       "How is the tissue architecture arranged?"),
    "cell_size": ("What is the predominant cell size?", "Are the cells small or large?"),
    "cytology": ("Describe the cytology.", "What do the nuclei look like?", "Describe the cells you see."),
    "classify": ("What is the most likely diagnosis?", "What is your differential diagnosis?",
                 "What is your interpretation of this field?", "Which {subject} category does this image show?",
                 "What tissue or entity is shown here?"),
    "next_steps": ("What would you do next to confirm the diagnosis?", "Which stains would help here?",
                   "What ancillary tests would separate the top possibilities?",
                   "Which immunostains should I order?", "How would you confirm this?"),
    "region": ("What is in the zoomed region?", "Describe the region I zoomed into.",
               "What does this zoomed area show?"),
    "adequacy": ("Is this specimen adequate for diagnosis?", "Is there enough tissue to assess?",
                 "Is the sample adequate?"),
    "second": ("And the second most likely?", "What is the second most likely?", "And the next one on the list?"),
    "why_not": ("Why not {name}?", "Why is it not {name}?", "What argues against {name}?"),
    "separate": ("Which stains would separate the top two?", "How would you tell these two apart?"),
}

# out-of-scope kinds: (question templates, what the answer needs that the case does not hold)
OUT_OF_SCOPE: dict[str, tuple[tuple[str, ...], str]] = {
    "prognosis": (("What is the prognosis?", "How long will this patient survive?",
                   "Is this an aggressive disease with a poor outcome?"),
                  ("prognosis needs the established diagnosis, the stage and clinical data (such as IPI or "
                  "FLIPI factors), none of which is in the case")),
    "treatment": (("How should this patient be treated?", "Which chemotherapy should be given?",
                   "Should the patient start therapy?"),
                  ("treatment is decided by the treating team from the final diagnosis, the stage and the "
                  "patient's condition, which the slides do not show")),
    "identity": (("Who is the patient?", "What is the patient's name and date of birth?",
                  "Can you identify the patient from the label?"),
                 ("patient identity is not available: label images are never read and the case holds no "
                 "identifiers")),
    "clinical": (("What stage is this disease?", "Does the patient have B symptoms?",
                  "Is the bone marrow involved?"),
                 ("stage and clinical findings need clinical information (history, imaging, bone marrow, "
                 "laboratory values) that is not in the case")),
}
REFUSAL_TAIL = "I can describe the morphology, give a differential and suggest ancillary tests."

FACT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "slides": ("Which slides are in this case?", "How many slides are there?", "List the slides of this case."),
    "immunostain": ("Which slide shows the immunostain?", "Which slides are immunostains?"),
    "he": ("Which slide is the H&E?",),
    "marker_slide": ("Which slide is stained for {marker}?", "Is there a {marker} slide?"),
    "stains": ("What stains were done?", "Which stains are in this case?"),
    "parts": ("Which parts are in this case?", "Which part is slide {slide} from?"),
    "results": ("What results were entered?", "Which ancillary results are available?"),
    "marker_result": ("What is the {marker} result?", "Was {marker} done?"),
}


# -- case facts -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideFact:
    name: str
    stain: str = "H&E"
    part: str | None = None
    role: str | None = None

    def label(self) -> str:
        extra = ", ".join(x for x in (self.stain, f"part {self.part}" if self.part else None,
                                      self.role.replace("_", " ") if self.role else None) if x)
        return f"{self.name} ({extra})"

    @property
    def marker(self) -> str | None:
        """The immunostain or special stain target, None for H&E."""
        return self.stain.split(":", 1)[1].strip() if ":" in self.stain else None


@dataclass(frozen=True)
class ResultFact:
    test: str
    target: str
    result: str
    value: Any = None

    def text(self) -> str:
        return ancillary.describe(self)


@dataclass
class CaseFacts:
    """What a case manifest (or the app's case tab) says: slides, entered results, clinical input."""

    slides: list[SlideFact] = field(default_factory=list)
    results: list[ResultFact] = field(default_factory=list)
    clinical: dict[str, Any] = field(default_factory=dict)
    case_id: str | None = None

    @classmethod
    def from_case(cls, case: Any) -> CaseFacts:
        slides = [SlideFact(s.name, s.stain, s.part, s.role) for s in case.slides]
        results = [ResultFact(r.test, r.target, r.result, r.value) for r in case.ancillary_results]
        return cls(slides, results, dict(case.clinical), case.id)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaseFacts:
        return cls([SlideFact(**s) for s in data.get("slides", [])],
                   [ResultFact(**r) for r in data.get("results", [])],
                   dict(data.get("clinical", {})), data.get("case_id"))

    def to_dict(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "clinical": self.clinical,
                "slides": [vars(s) for s in self.slides],
                "results": [{k: v for k, v in vars(r).items() if v is not None} for r in self.results]}

    def result_for(self, target: str) -> ResultFact | None:
        want = ancillary.canonical_target(target) or target
        hits = [r for r in self.results if (ancillary.canonical_target(r.target) or r.target) == want]
        return hits[-1] if hits else None  # a repeat replaces the first, as in the report

    def slides_for(self, target: str) -> list[SlideFact]:
        want = ancillary.canonical_target(target) or target.casefold()
        return [s for s in self.slides if s.marker and (ancillary.canonical_target(s.marker) or
                                                         s.marker.casefold()) == want]


def case_preamble(facts: CaseFacts) -> str:
    """The case as text, for training conversations whose slide marker carries no names."""
    slides = "; ".join(s.label() for s in facts.slides)
    results = "; ".join(r.text() for r in facts.results) or "none"
    return f"Case slides: {slides}. Entered results: {results}."


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def fact_answer(kind: str, facts: CaseFacts, marker: str | None = None, slide: str | None = None) -> str:
    """The exact answer to a case-fact question of `kind` (see FACT_QUESTIONS)."""
    n = len(facts.slides)
    if kind == "slides":
        return f"The case has {n} slide{'s' if n != 1 else ''}: {_join([s.label() for s in facts.slides])}."
    if kind in ("immunostain", "he"):
        hits = [s for s in facts.slides if (s.marker is None) == (kind == "he")]
        what = "immunostain or special stain" if kind == "immunostain" else "H&E slide"
        if not hits:
            return f"No slide in this case is an {what}."
        return f"{'The ' + what + ' is' if len(hits) == 1 else 'These slides are ' + what + 's:'} " \
               f"{_join([s.label() for s in hits])}."
    if kind == "stains":
        return "Stains: " + "; ".join(f"{s.stain} on {s.name}" for s in facts.slides) + "."
    if kind == "parts":
        if slide:
            hit = next((s for s in facts.slides if s.name == slide), None)
            if hit is None:
                return f"There is no slide {slide} in this case; the slides are {_join([s.name for s in facts.slides])}."
            return f"Slide {hit.name} is from part {hit.part}." if hit.part else \
                f"Slide {hit.name} has no part recorded in the case."
        parts = sorted({s.part for s in facts.slides if s.part})
        if not parts:
            return "No parts are recorded in this case."
        return "Parts: " + "; ".join(f"{p} ({_join([s.name for s in facts.slides if s.part == p])})"
                                     for p in parts) + "."
    if kind == "results":
        if not facts.results:
            return "No ancillary results have been entered for this case."
        return "Entered results: " + "; ".join(r.text() for r in facts.results) + "."
    if kind == "marker_slide":
        hits = facts.slides_for(marker or "")
        if hits:
            return f"{marker} is on slide {_join([s.label() for s in hits])}."
        return f"No slide in this case is stained for {marker}."
    if kind == "marker_result":
        r = facts.result_for(marker or "")
        if r is not None:
            return f"{r.text()}, as entered in the case."
        on = facts.slides_for(marker or "")
        slide_note = f" (a {marker} slide is in the case: {on[0].name})" if on else ""
        return f"No {marker} result has been entered for this case{slide_note}."
    raise ValueError(f"unknown case-fact kind {kind!r}")


# -- refusal ----------------------------------------------------------------------------------
def refusal(kind: str) -> str:
    missing = OUT_OF_SCOPE[kind][1]
    return f"I can't answer that from the slides: {missing}. {REFUSAL_TAIL}"


# -- entities, phenotypes and the tests that separate them ------------------------------------
# Well-established immunophenotypes (WHO-HAEM5) beside what the marker rules encode, so that a
# marker shared by two entities (BCL2 in FL and MCL) is never offered as separating them.
PHENOTYPE_EXTRA: dict[str, dict[str, str]] = {
    "Chronic lymphocytic leukaemia/small lymphocytic lymphoma": {"CD10": "negative", "BCL2": "positive",
                                                                 "SOX11": "negative"},
    "Mantle cell lymphoma": {"CD23": "negative", "CD10": "negative", "BCL2": "positive", "LEF1": "negative"},
    "Follicular lymphoma": {"CD5": "negative", "cyclin D1": "negative", "BCL2": "positive"},
    "Diffuse large B-cell lymphoma, NOS": {"CD20": "positive", "CD30": "negative", "CD15": "negative"},
    "Classic Hodgkin lymphoma": {"CD20": "negative", "BCL6": "negative"},
}
_NEGATE = {"positive": "negative", "negative": "positive", "loss": "intact", "intact": "loss"}


def entity_of(name: str) -> str | None:
    """The report's entity name for a class label, alias or entity name (None if not an entity)."""
    if name in ENTITY_PANELS:
        return name
    if name in ENTITY_ALIASES:
        return ENTITY_ALIASES[name]
    folded = _fold(name)
    for entity in ENTITY_PANELS:
        if _fold(entity) == folded or _fold(entity.split(",")[0]) == folded:
            return entity
    for alias, entity in ENTITY_ALIASES.items():
        if _fold(alias) == folded:
            return entity
    hits = [e for e in ENTITY_PANELS if len(folded) >= 6 and folded in _fold(e)]
    return hits[0] if len(hits) == 1 else None


def _fold(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.casefold())


def expected_phenotype(entity: str) -> dict[str, str]:
    """Marker -> expected result for an entity, from its panel, the marker rules and AGAINST."""
    out: dict[str, str] = {}
    for item in ENTITY_PANELS.get(entity, ()):
        m = re.match(r"^(.*?)\s+(negative|weak|positive)\b", item)
        target, result = (m.group(1), m.group(2)) if m else (item, "positive")
        canon = ancillary.canonical_target(target)
        if canon:
            out[canon] = result
    for rule in ancillary.RULES:
        if rule.entity == entity:
            for cond in (*rule.all_of, *rule.any_of, *rule.establish_also):
                out[cond.target] = min(cond.results)
    for cond in ancillary.AGAINST.get(entity, ()):
        against = min(cond.results)
        if against in _NEGATE:
            out[cond.target] = _NEGATE[against]
    for target, result in PHENOTYPE_EXTRA.get(entity, {}).items():
        out.setdefault(target, result)
    return out


def separating_tests(a: str, b: str) -> list[tuple[str, str, str]]:
    """(marker, expected in a, expected in b) for markers whose expected results differ; markers
    known for one entity only follow when no marker is known for both."""
    pa, pb = expected_phenotype(a), expected_phenotype(b)
    both = [(m, pa[m], pb[m]) for m in pa if m in pb and pa[m] != pb[m]]
    one = [(m, pa.get(m, "?"), pb.get(m, "?")) for m in (*pa, *pb) if (m in pa) != (m in pb)]
    return both if both else list(dict.fromkeys(one))


def _short(entity: str) -> str:
    short = {v: k for k, v in ENTITY_ALIASES.items() if k.isupper() or "/" in k}
    return short.get(entity, entity)


def next_steps_answer(entities: Sequence[str], results: Sequence[ResultFact] = (),
                      fallback: str | None = None) -> str:
    """Which tests separate the top two entities (or confirm the top one), naming what is entered.

    Args:
        entities: ranked differential, entity names or aliases (best first).
        results: results already entered in the case (they are named, not re-suggested).
        fallback: tests to suggest when the top class is not a lymphoma entity.
    """
    names = [e for e in (entity_of(x) for x in entities) if e]
    done = {ancillary.canonical_target(r.target) or r.target: r for r in results}
    entered = f" Already entered: {'; '.join(r.text() for r in results)}." if results else ""
    if not names:
        what = fallback or "no ancillary test is needed to call this tissue class on H&E; review the whole slide"
        return f"Next steps: {what}.{entered} Suggestions for the pathologist, not orders."
    top = names[0]
    if len(names) > 1:
        second = names[1]
        rows = [(m, x, y) for m, x, y in separating_tests(top, second) if m not in done][:3]
        listed = "; ".join(f"{m} ({_short(top)} {x}, {_short(second)} {y})".replace(" ?", " not typical")
                           for m, x, y in rows)
        head = f"To separate {top} from {second}: {listed}." if rows else \
            f"The entered results already cover the tests that separate {top} from {second}."
    else:
        head = f"To confirm {top}: {', '.join(ENTITY_PANELS[top])}."
    return f"{head}{entered} Suggestions for the pathologist; H&E alone does not establish the entity."


# -- image answer forms -----------------------------------------------------------------------
def describe_answer(aspect: str | None, features: Mapping[str, str], caption: str) -> str:
    """A description: the asked aspect under its report label, or the caption for a general ask."""
    if aspect and features.get(aspect):
        return f"{ASPECTS[aspect]}: {features[aspect]}."
    return caption


def differential_answer(ranked: Sequence[tuple[str, float | None]], confirm: str | None = None) -> str:
    """A ranked differential hedged as the report's: morphologic impression only.

    Args:
        ranked: (name, probability or None), best first; two or three are shown.
        confirm: the tests that establish the top entity (None: a tissue class, no confirmation).
    """
    def shown(name: str, p: float | None) -> str:
        return f"{name} ({p:.0%})" if p is not None else name

    top = shown(*ranked[0])
    rest = [shown(n, p) for n, p in ranked[1:3]]
    text = f"Most consistent with {top}" + (f"; differential: {', '.join(rest)}." if rest else ".")
    if confirm:
        text += f" Morphologic impression only: confirm with {confirm}."
    else:
        text += " Impression from H&E only, a draft for the pathologist."
    return text


def second_answer(second: str, top: str, features: Mapping[str, str], p: float | None = None) -> str:
    pattern = features.get("growth_pattern") or features.get("cytology")
    why = f" ({pattern})" if pattern else ""
    pct = f" at {p:.0%}" if p is not None else ""
    return f"The second most likely is {second}{pct}{why}; it ranks below {top} on this field."


def why_not_answer(asked: str, top: str, asked_features: Mapping[str, str], tests: str | None) -> str:
    expected = asked_features.get("growth_pattern") or asked_features.get("cytology")
    text = f"{asked[0].upper() + asked[1:]} is less likely here: the field looks more like {top}"
    text += f", and {asked} would show {expected}." if expected else "."
    if tests:
        text += f" To exclude it: {tests}."
    return text


def region_answer(text: str) -> str:
    return "In the zoomed region: " + text[0].lower() + text[1:]


def adequacy_answer(adequacy: str, name: str, confirm: str | None, features: Mapping[str, str]) -> str:
    if adequacy == "Inadequate":
        return "Inadequate: there is no tissue in this field to assess."
    if adequacy == "Limited":
        what = features.get("cytology") or name
        return f"Limited: the field is mostly {name} ({what}); viable lesional tissue is needed."
    text = f"Adequate for a morphologic impression: the field shows {name}."
    if confirm:
        text += f" Classification still needs {confirm}."
    return text
