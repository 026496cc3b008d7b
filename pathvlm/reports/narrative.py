"""The narrative microscopic description, written from the filled fields only.

A deterministic template turns the fact list (filled fields, the differential, the tissue
composition) into prose. An LLM may write the prose instead, but its text is used only when
`check_prose` finds nothing wrong with it: every entity, field value and number it names is in
the fact list (numbers next to an entity are that entity's), no field without a value is
mentioned, and nothing is repeated. Otherwise the template is used. The banner comes first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pathvlm.reports.findings import CRC_LABELS
from pathvlm.reports.schemas import BANNER, ReportType
from pathvlm.reports.tables import ENTITY_ALIASES, ENTITY_PANELS

log = logging.getLogger(__name__)

_SOURCE_WORDS = {"image": "from the image", "clinical": "as entered",
                 "ancillary_result": "per ancillary results", "derived": "derived"}
# one-word labels that ordinary prose uses without meaning the field
_GENERIC_LABELS = frozenset({"specimen", "procedure"})
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def _show(value: Any, unit: str = "") -> str:
    text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"{text} {unit}".strip() if unit else text


def _norm(text: str) -> str:
    t = text.casefold().replace("leukemia", "leukaemia").replace("tumor", "tumour")
    return " ".join(t.replace("-", " ").split())


@dataclass
class Facts:
    """What prose may say: fact lines, the values and entities they name, their numbers."""

    lines: list[str] = field(default_factory=list)
    values: set[str] = field(default_factory=set)  # normalised field values and entities
    numbers: set[float] = field(default_factory=set)
    entity_numbers: dict[str, set[float]] = field(default_factory=dict)


def _numbers(text: str) -> set[float]:
    return {float(x) for x in _NUMBER.findall(text)}


def build_facts(rtype: ReportType, fields: Mapping[str, Mapping[str, Any]],
                differential: Sequence[Mapping[str, Any]] | None = None,
                threshold: float | None = None,
                composition: Mapping[str, Any] | None = None) -> Facts:
    """The fact list: one line per filled field (absent values are never mentioned), the
    leading differential entries, and the determined tissue composition."""
    f = Facts()
    for spec in rtype.fields:
        entry = fields.get(spec.name, {})
        if entry.get("value") is None:
            continue
        src = _SOURCE_WORDS.get(str(entry.get("source")), str(entry.get("source")))
        line = f"{spec.label}: {_show(entry['value'], spec.unit)} ({src})"
        values = entry["value"] if isinstance(entry["value"], list) else [entry["value"]]
        f.values.update(_norm(str(v)) for v in values)
        f.values.add(_norm(spec.label))
        f.lines.append(line)
    if differential:
        top = differential[:3]
        ranked = ", ".join(f"{d['entity']} {d['probability']:.0%}" for d in top)
        lead = top[0]
        if threshold is not None and lead["probability"] >= threshold:
            f.lines.append(f"Leading morphologic impression (requires ancillary testing): "
                           f"{lead['entity']}; differential {ranked}")
        else:
            f.lines.append("Morphologic differential (impression only, no entity reaches the "
                           f"threshold; requires ancillary testing): {ranked}")
        for d in top:
            f.values.add(_norm(d["entity"]))
            f.entity_numbers[_norm(d["entity"])] = {round(100 * d["probability"]),
                                                    round(d["probability"], 2)}
    if composition and composition.get("fractions"):
        parts = [f"{CRC_LABELS.get(c, c)} {p:.0%}" for c, p in sorted(
            composition["fractions"].items(), key=lambda kv: -kv[1]) if p > 0][:4]
        if parts:
            und = composition.get("undetermined", 0.0)
            f.lines.append("Tissue composition: " + ", ".join(parts)
                           + (f"; undetermined {und:.0%}" if und else ""))
            f.values.update(_norm(CRC_LABELS.get(c, c)) for c in composition["fractions"])
    for line in f.lines:
        f.numbers |= _numbers(line)
    return f


def _entity_terms() -> dict[str, str]:
    """Normalised ways prose names an entity -> the entity's normalised WHO name."""
    terms: dict[str, str] = {}
    for entity in ENTITY_PANELS:
        full = _norm(entity)
        terms[full] = full
        for part in re.split(r"[/,]", entity):
            part = _norm(part)
            if part and part not in ("nos",) and len(part) > 3:
                terms[part] = full
    for alias, entity in ENTITY_ALIASES.items():
        if alias.lower() != "reactive":
            terms[_norm(alias)] = _norm(entity)
    terms["hodgkin"] = _norm("Classic Hodgkin lymphoma")
    return terms


def _find(term: str, text: str) -> list[int]:
    return [m.start() for m in re.finditer(rf"(?<![\w]){re.escape(term)}(?![\w])", text)]


def check_prose(text: str, rtype: ReportType, fields: Mapping[str, Mapping[str, Any]],
                facts: Facts) -> list[str]:
    """Problems that disqualify LLM prose (empty list: accept it)."""
    problems: list[str] = []
    t = _norm(text)
    if not t:
        return ["empty"]
    # entities: each named one is a fact, named once, and any number beside it is its own
    terms = _entity_terms()
    spans: list[tuple[int, int, str]] = []
    for term in sorted(terms, key=len, reverse=True):
        for start in _find(term, t):
            if any(a <= start < b for a, b, _ in spans):
                continue  # inside a longer name already found
            spans.append((start, start + len(term), terms[term]))
    spans.sort()
    seen: dict[str, int] = {}
    for i, (a, b, entity) in enumerate(spans):
        seen[entity] = seen.get(entity, 0) + 1
        if entity not in facts.values:
            problems.append(f"names {entity!r}, which is not in the facts")
            continue
        end = spans[i + 1][0] if i + 1 < len(spans) else len(t)
        stop = min([end] + [t.find(c, b) for c in ".;" if t.find(c, b) > 0])
        for num in _numbers(t[b:stop]):
            if num not in facts.entity_numbers.get(entity, set()):
                problems.append(f"gives {entity!r} the number {num:g}, the facts do not")
    problems += [f"repeats {e!r}" for e, n in seen.items() if n > 1]
    # field values and labels: only filled fields' values; no field that holds no value
    for spec in rtype.fields:
        entry = fields.get(spec.name, {})
        label = _norm(spec.label)
        if entry.get("value") is None and label not in _GENERIC_LABELS and _find(label, t):
            problems.append(f"mentions {spec.label!r}, which has no value")
        for v in spec.values:
            nv = _norm(v)
            if (len(nv) >= 9 or " " in nv) and nv not in facts.values and _find(nv, t):
                problems.append(f"names the value {v!r}, which is not in the facts")
    # numbers: every one is in the facts (as given, or as a fraction / percentage of one)
    known = facts.numbers | {round(n / 100, 2) for n in facts.numbers} | {
        round(n * 100) for n in facts.numbers if n <= 1}
    for num in _numbers(t):
        if num not in known and round(num, 2) not in known:
            problems.append(f"gives the number {num:g}, which is not in the facts")
    # repetition: no sentence twice, no six-word run twice
    sentences = [s.strip(" .!?") for s in re.split(r"[.!?]\s", t) if s.strip(" .!?")]
    if len(sentences) != len(set(sentences)):
        problems.append("repeats a sentence")
    words = t.split()
    runs = [" ".join(words[i:i + 6]) for i in range(max(0, len(words) - 5))]
    if len(runs) != len(set(runs)):
        problems.append("repeats a phrase")
    return list(dict.fromkeys(problems))


def fact_lines(rtype: ReportType, fields: Mapping[str, Mapping[str, Any]],
               differential: Sequence[Mapping[str, Any]] | None = None,
               threshold: float | None = None) -> list[str]:
    """One line per filled field (absent values are never mentioned), plus the differential."""
    return build_facts(rtype, fields, differential, threshold).lines


def narrate(rtype: ReportType, fields: Mapping[str, Mapping[str, Any]],
            differential: Sequence[Mapping[str, Any]] | None = None,
            flags: Sequence[str] = (), llm: Callable[[str], str] | None = None,
            threshold: float | None = None, composition: Mapping[str, Any] | None = None
            ) -> tuple[str, str]:
    """Banner plus a description of the filled fields, and where the prose came from.

    Args:
        rtype: the report type.
        fields: field name -> entry dict ("value"/"reason", "source", ...).
        differential: lymphoma morphologic differential, best first.
        flags: items for the pathologist's attention.
        llm: optional prompt -> text call; its text is used only if `check_prose` passes.
        threshold: the min_confidence in force (decides whether the differential has a lead).
        composition: the colorectal tissue composition of the report.

    Returns:
        (narrative, "llm" or "template").
    """
    facts = build_facts(rtype, fields, differential, threshold, composition)
    body, source = "", "template"
    if llm is not None and facts.lines:
        prompt = ("Write a short microscopic description for a draft pathology report "
                  f"({rtype.title}). Use only these findings, each once; add nothing else:\n- "
                  + "\n- ".join(facts.lines))
        out = llm(prompt)
        out = out.strip() if isinstance(out, str) else ""
        problems = check_prose(out, rtype, fields, facts)
        if problems:
            log.info("LLM narrative rejected (%s); using the template", "; ".join(problems[:4]))
        else:
            body, source = out, "llm"
    if not body:
        if facts.lines:
            body = f"{rtype.title}. " + " ".join(f"{line}." for line in facts.lines)
        else:
            body = f"{rtype.title}. No field could be filled from the submitted material."
    open_count = sum(1 for e in fields.values() if e.get("value") is None)
    tail = f" {open_count} field(s) remain open, each with its reason." if open_count else ""
    flag_text = (" Flags: " + " ".join(f"[{f}]" for f in flags)) if flags else ""
    return f"{BANNER}\n\n{body}{tail}{flag_text}", source


def write_narrative(rtype: ReportType, fields: Mapping[str, Mapping[str, Any]],
                    differential: Sequence[Mapping[str, Any]] | None = None,
                    flags: Sequence[str] = (), llm: Callable[[str], str] | None = None) -> str:
    """`narrate` without the source (kept for callers of the first API)."""
    return narrate(rtype, fields, differential, flags, llm)[0]
