"""Which kind of question was asked: a small keyword/regex router, no model and no network.

`route_question` maps a question (and the chat so far) to a `Route`: one of the chat question
types of `pathvlm.data.dialogue` with its detail (the case-fact kind, the out-of-scope kind, the
follow-up kind, the aspect to describe, the marker or slide named), `closed` for multiple-choice
and yes/no prompts, or `other`. Rules are tried in order; the first that matches wins.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pathvlm.reports import ancillary


@dataclass(frozen=True)
class Route:
    kind: str  # a dialogue.QUESTION_TYPES key, "closed" or "other"
    detail: str | None = None
    marker: str | None = None  # canonical marker named in the question
    slide: str | None = None  # slide name named in the question
    asked: str | None = None  # the entity of "why not X?"


def _rx(*words: str) -> re.Pattern[str]:
    return re.compile(r"(?:" + "|".join(words) + r")", re.IGNORECASE)


CLOSED = _rx(r"\n\s*[A-H][.)]\s", r"\b[A-H]\)\s.+\b[B-H]\)\s", r"answer with the option", r"answer yes or no",
             r"allowed values", r"\bthen answer yes or no")
OUT_OF_SCOPE = {
    "identity": _rx(r"\bwho is (the|this) patient", r"patient'?s? (name|identity|id\b|date of birth|address|age)",
                    r"name of (the|this) patient", r"date of birth", r"\bmrn\b", r"medical record",
                    r"identify (the|this) patient", r"\bwhose (slide|biopsy|specimen)", r"social security"),
    "treatment": _rx(r"\btreat", r"therap", r"\bchemo", r"regimen", r"r-?chop", r"rituximab", r"radiotherap",
                     r"\bdrugs?\b", r"\bdose\b", r"medication", r"transplant", r"\bmanage(ment)?\b"),
    "prognosis": _rx(r"prognos", r"surviv", r"life expectancy", r"how long (will|does|do|has)", r"outcome",
                     r"mortality", r"\b(ipi|flipi|ips)\b", r"curable", r"\bcured?\b", r"\bdie\b", r"relapse"),
    "clinical": _rx(r"\bstag(e|ing)\b", r"ann arbor", r"lugano", r"b symptoms?", r"symptoms?", r"\bhistory\b",
                    r"bone marrow", r"\blab(oratory)?\b", r"\bldh\b", r"blood count", r"\bpet\b", r"ct scan",
                    r"imaging", r"how old", r"\bgender\b", r"\bsex of\b", r"\bhiv\b", r"family"),
}
SECOND = _rx(r"\bsecond\b", r"next (one|most likely|on the list)", r"runner[- ]up", r"after that")
WHY_NOT = re.compile(r"(?:why (?:is it )?not|what argues against|why not consider|how do you exclude|"
                     r"could it be|what about)\s+(?:a |an )?(.+?)\s*\??$", re.IGNORECASE)
SEPARATE = _rx(r"\bseparate\b", r"tell (these|them|the|those)( top)?( two)? apart", r"distinguish", r"differentiate")
NEXT_STEPS = _rx(r"\bnext\b", r"\bconfirm", r"\border\b", r"recommend", r"suggest", r"would help", r"should (i|we)",
                 r"work[- ]?up", r"\bwhat (tests?|stains?|markers?|ihc) (would|should|to|do|are needed)",
                 r"which (tests?|stains?|markers?|immunostains?|ihc) (would|should|to|do i|are needed)",
                 r"to (exclude|rule out)", r"ancillary (tests?|studies) (would|to|should)", r"help (to )?decide")
FACT_WORDS = _rx(r"\bslides?\b", r"immunostain", r"\bihc\b", r"\bstain(s|ed|ing)?\b", r"h&e", r"\bparts?\b",
                 r"\bblocks?\b", r"\bresults?\b", r"\bentered\b", r"\bperformed\b", r"\bdone\b", r"\bavailable\b",
                 r"\bin (this|the) case\b")
ON_THIS = re.compile(r"\b(on|in|of|from) (this|the) (slide|image|field|section)\b", re.IGNORECASE)
REGION = _rx(r"\bzoom", r"\bregion\b", r"\bthis area\b", r"selected area", r"\bcrop\b", r"\bclose[- ]up\b")
ADEQUACY = _rx(r"adequa", r"enough tissue", r"sufficient", r"\bquality\b", r"representative", r"diagnostic material")
CLASSIFY = _rx(r"diagnos", r"differential", r"\bcategor(y|ies)\b", r"interpret", r"classif", r"most likely", r"consistent with",
               r"what (is|kind of|type of) (this|it|lesion|tumou?r|entity)", r"which (entity|lymphoma|category|tissue|class)",
               r"what tissue", r"what entity", r"\bis (this|it) (a |an )?[\w/ -]*(lymphoma|carcinoma|tumou?r|cancer|malignan)",
               r"\bwhat lymphoma\b", r"\bbenign or malignant\b")
ASPECT = {"growth_pattern": _rx(r"growth pattern", r"architecture", r"\bpattern\b", r"arranged", r"arrangement"),
          "cell_size": _rx(r"cell size", r"size of the cells", r"small or large", r"large or small",
                           r"how (big|large) are"),
          "cytology": _rx(r"cytolog", r"nucle(i|us|ar)", r"chromatin", r"describe the cells", r"the cells look")}
DESCRIBE = _rx(r"describe", r"description", r"morpholog", r"what do you see", r"\bfeatures?\b", r"\bshow(s|n)?\b",
               r"\bsee\b", r"\blook like\b", *(p.pattern for p in ASPECT.values()))


def find_marker(question: str) -> str | None:
    """The first known marker or test target the question names (words and word pairs)."""
    words = re.findall(r"[A-Za-z0-9][\w;:()/-]*", question)
    for n in (3, 2, 1):
        for i in range(len(words) - n + 1):
            text = " ".join(words[i: i + n]).rstrip("?.,;:")
            hit = ancillary.canonical_target(text)
            if hit and not (n == 1 and text.casefold() in ("msi",) and "microsatellite" not in question.lower()):
                return hit
    return None


def _fact_kind(q: str, marker: str | None, slide: str | None) -> str:
    low = q.lower()
    if marker:
        if re.search(r"\bslides?\b|stained|\bstain\b", low) and not re.search(r"result|positive|negative", low):
            return "marker_slide"
        return "marker_result"
    if re.search(r"\bparts?\b|\bblocks?\b", low):
        return "parts"
    if re.search(r"immunostain|\bihc\b|special stain|immunohisto", low):
        return "immunostain"
    if re.search(r"h&e|\bhe slide\b|hematoxylin", low):
        return "he"
    if re.search(r"results?|entered|ancillary|performed", low):
        return "results"
    if re.search(r"stain", low):
        return "stains"
    return "slides"


def route_question(question: str, history: Sequence[dict[str, str]] | None = None,
                   slide_names: Sequence[str] = ()) -> Route:
    """The kind of `question` (see `Route`); `slide_names` lets a question name a slide."""
    q = question.replace("<slide>", " ").strip()
    if CLOSED.search(q):
        return Route("closed")
    for kind, rx in OUT_OF_SCOPE.items():
        if rx.search(q):
            return Route("out_of_scope", kind)
    m = WHY_NOT.search(q)
    if m and not FACT_WORDS.search(m.group(1)):
        return Route("followup", "why_not", asked=m.group(1).strip(" ?."))
    has_prior = any(t.get("role") == "assistant" for t in history or ())
    if SECOND.search(q) and (has_prior or re.search(r"likely|differential|diagnos", q, re.IGNORECASE)):
        return Route("followup", "second")
    if SEPARATE.search(q) or NEXT_STEPS.search(q):
        return Route("next_steps", "separate" if SEPARATE.search(q) else None)
    marker = find_marker(q)
    slide = next((s for s in slide_names if s and re.search(rf"\b{re.escape(s)}\b", q)), None)
    # "what do you see on this slide" is about the pixels, not about which slides there are
    bare = ON_THIS.sub(" ", q)
    if (FACT_WORDS.search(bare) or marker) and not REGION.search(q):
        return Route("facts", _fact_kind(bare, marker, slide), marker=marker, slide=slide)
    if REGION.search(q):
        return Route("region")
    if ADEQUACY.search(q):
        return Route("adequacy")
    if CLASSIFY.search(q):
        return Route("classify")
    aspect = next((a for a, rx in ASPECT.items() if rx.search(q)), None)
    if aspect or DESCRIBE.search(q):
        return Route("describe", aspect)
    return Route("other")
