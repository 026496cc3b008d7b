"""Training conversations of every chat question type for one labelled image (`pathvlm data build`).

Templates come from the class file (names, captions, `features`, `confirm`, `adequacy`,
`next_steps`), the marker rules and synthetic cases built around the image; the answer forms are
`pathvlm.data.dialogue`'s, the ones the chat router writes at inference. Follow-ups are two-turn
conversations whose second question refers to the first answer. Extend by adding a type to
`dialogue.QUESTION_TYPES` and a branch here.
"""

from __future__ import annotations

import random
from typing import Any

from pathvlm.data import dialogue as dlg
from pathvlm.data.classes import ClassInfo, ClassSet
from pathvlm.data.formats import SLIDE_TOKEN

CHAT_TYPES = tuple(dlg.QUESTION_TYPES)
_CRC_MARKERS = {"MLH1": ("intact", "loss"), "PMS2": ("intact", "loss"), "MSH2": ("intact",),
                "MSH6": ("intact",), "CDX2": ("positive",), "CK20": ("positive",)}

Turns = list[dict[str, str]]


def _user(text: str, first: bool) -> dict[str, str]:
    return {"role": "user", "content": f"{SLIDE_TOKEN}\n{text}" if first else text}


def _bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _features(info: ClassInfo) -> dict[str, str]:
    return dict(info.features)


def _tests(info: ClassInfo) -> str | None:
    """What the next-steps answer suggests for a class that is not a lymphoma entity."""
    if info.next_steps:
        return info.next_steps
    return f"confirm with {info.confirm}" if info.confirm else None


def types_for_image(index: int, tasks: tuple[str, ...], per_image: int) -> list[str]:
    """The chat types one image gets: a window rotating over the types, so all are balanced."""
    chat = [t for t in tasks if t in CHAT_TYPES]
    if not chat or per_image <= 0:
        return []
    n = min(per_image, len(chat))
    start = (index * n) % len(chat)
    return [chat[(start + j) % len(chat)] for j in range(n)]


def _ranked(info: ClassInfo, classes: ClassSet, rng: random.Random) -> list[ClassInfo]:
    others = [c for c in classes.classes if c.label != info.label]
    return [info, *rng.sample(others, min(2, len(others)))]


def _differential(ranked: list[ClassInfo]) -> str:
    return dlg.differential_answer([(c.name, None) for c in ranked], ranked[0].confirm)


def _separate(a: ClassInfo, b: ClassInfo) -> str | None:
    ea, eb = dlg.entity_of(a.label), dlg.entity_of(b.label)
    if not (ea and eb):
        return None
    rows = dlg.separating_tests(ea, eb)[:2]
    na, nb = _brief(a), _brief(b)
    return ", ".join(f"{m} ({x} in {na}, {y} in {nb})".replace("? in", "not typical in")
                     for m, x, y in rows) or None


def _brief(info: ClassInfo) -> str:
    return min((info.name, *info.synonyms), key=len)


def synthetic_case(info: ClassInfo, rng: random.Random) -> dlg.CaseFacts:
    """A plausible case around an image of `info`: the image as H&E plus 0-3 stained slides and
    results entered as the entity's phenotype expects."""
    entity = dlg.entity_of(info.label)
    phenotype = dlg.expected_phenotype(entity) if entity else {
        m: rng.choice(r) for m, r in _CRC_MARKERS.items()}
    markers = rng.sample(sorted(phenotype), min(len(phenotype), rng.randint(0, 3)))
    part = rng.choice("ABC")
    slides = [dlg.SlideFact(f"{part}1", "H&E", part, rng.choice([None, None, "tumor", "lymph_node"]))]
    for j, m in enumerate(markers):
        p = rng.choice([part, part, "ABCD"[("ABC".index(part) + 1)]])
        slides.append(dlg.SlideFact(f"{p}{j + 2}", f"IHC:{m}", p))
    entered = rng.sample(sorted(phenotype), min(len(phenotype), rng.randint(0, 3)))
    results = [dlg.ResultFact("IHC", m, phenotype[m]) for m in entered]
    return dlg.CaseFacts(slides, results)


def _fact(facts: dlg.CaseFacts, rng: random.Random) -> tuple[str, str, dict[str, Any]]:
    kind = rng.choice(list(dlg.FACT_QUESTIONS))
    stained = [s for s in facts.slides if s.marker]
    marker = rng.choice([s.marker for s in stained] + [r.target for r in facts.results] + ["CD10", "CD30"])
    slide = rng.choice(facts.slides).name
    question = rng.choice(dlg.FACT_QUESTIONS[kind]).format(marker=marker, slide=slide)
    if kind == "parts" and "{slide}" not in question:
        slide = None
    answer = dlg.fact_answer(kind, facts, marker=marker, slide=slide)
    return question, answer, {"kind": kind, "marker": marker, "asked_slide": slide}


def chat_turns(kind: str, info: ClassInfo, classes: ClassSet, rng: random.Random) -> tuple[Turns, dict[str, Any]]:
    """One conversation of chat type `kind` about an image of `info`, and its metadata."""
    feats, caption = _features(info), rng.choice(info.captions)
    if kind == "describe":
        aspect = rng.choice([None, *sorted(k for k in feats if k in dlg.ASPECTS)])
        question = rng.choice(dlg.QUESTIONS[aspect or "describe"])
        return [_user(question, True), _bot(dlg.describe_answer(aspect, feats, caption))], {"aspect": aspect}
    if kind == "classify":
        ranked = _ranked(info, classes, rng)
        question = rng.choice(dlg.QUESTIONS["classify"]).format(subject=classes.subject)
        return [_user(question, True), _bot(_differential(ranked))], {"differential": [c.label for c in ranked]}
    if kind == "next_steps":
        answer = dlg.next_steps_answer([info.label], fallback=_tests(info))
        return [_user(rng.choice(dlg.QUESTIONS["next_steps"]), True), _bot(answer)], {}
    if kind == "facts":
        facts = synthetic_case(info, rng)
        question, answer, meta = _fact(facts, rng)
        text = f"{dlg.case_preamble(facts)}\n{question}"
        return [_user(text, True), _bot(answer)], {**meta, "case": facts.to_dict()}
    if kind == "region":
        return [_user(rng.choice(dlg.QUESTIONS["region"]), True), _bot(dlg.region_answer(caption))], {}
    if kind == "adequacy":
        answer = dlg.adequacy_answer(info.adequacy, info.name, info.confirm, feats)
        return [_user(rng.choice(dlg.QUESTIONS["adequacy"]), True), _bot(answer)], {"adequacy": info.adequacy}
    if kind == "out_of_scope":
        which = rng.choice(sorted(dlg.OUT_OF_SCOPE))
        question = rng.choice(dlg.OUT_OF_SCOPE[which][0])
        return [_user(question, True), _bot(dlg.refusal(which))], {"kind": which}
    if kind == "followup":
        return _followup(info, classes, rng)
    raise ValueError(f"unknown chat type {kind!r} (known: {', '.join(CHAT_TYPES)})")


def _followup(info: ClassInfo, classes: ClassSet, rng: random.Random) -> tuple[Turns, dict[str, Any]]:
    ranked = _ranked(info, classes, rng)
    first = [_user(rng.choice(dlg.QUESTIONS["classify"]).format(subject=classes.subject), True),
             _bot(_differential(ranked))]
    kinds = ["second", "why_not"] + (["separate"] if dlg.entity_of(info.label) and
                                     len(ranked) > 1 and dlg.entity_of(ranked[1].label) else [])
    which = rng.choice(kinds) if len(ranked) > 1 else "why_not"
    meta: dict[str, Any] = {"kind": which, "differential": [c.label for c in ranked]}
    if which == "second":
        second = ranked[1]
        question = rng.choice(dlg.QUESTIONS["second"])
        answer = dlg.second_answer(second.name, info.name, _features(second))
    elif which == "why_not":
        others = [c for c in classes.classes if c.label != info.label]
        asked = rng.choice(others) if others else info
        meta["asked"] = asked.label
        question = rng.choice(dlg.QUESTIONS["why_not"]).format(name=asked.name)
        answer = dlg.why_not_answer(asked.name, info.name, _features(asked),
                                    _separate(info, asked) or _tests(asked))
    else:
        question = rng.choice(dlg.QUESTIONS["separate"])
        answer = dlg.next_steps_answer([info.label, ranked[1].label])
    return [*first, _user(question, False), _bot(answer)], meta
