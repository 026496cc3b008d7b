"""The narrative microscopic description, written from the filled fields only.

With an LLM callable the model writes prose from a fact list; without one (or when it returns
nothing usable) a deterministic template does. Either way the banner comes first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pathvlm.reports.schemas import BANNER, ReportType

log = logging.getLogger(__name__)

_SOURCE_WORDS = {"image": "from the image", "clinical": "as entered",
                 "ancillary_result": "per ancillary results", "derived": "derived"}


def _show(value: Any, unit: str = "") -> str:
    text = "; ".join(map(str, value)) if isinstance(value, list) else str(value)
    return f"{text} {unit}".strip() if unit else text


def fact_lines(rtype: ReportType, fields: Mapping[str, Mapping[str, Any]],
               differential: Sequence[Mapping[str, Any]] | None = None) -> list[str]:
    """One line per filled field (absent values are never mentioned)."""
    lines = []
    for spec in rtype.fields:
        entry = fields.get(spec.name, {})
        if entry.get("value") is None:
            continue
        src = _SOURCE_WORDS.get(str(entry.get("source")), str(entry.get("source")))
        lines.append(f"{spec.label}: {_show(entry['value'], spec.unit)} ({src})")
    if differential:
        top = ", ".join(f"{d['entity']} {d['probability']:.0%}" for d in differential[:3])
        lines.append(f"Morphologic differential (impression only, requires ancillary testing): "
                     f"{top}")
    return lines


def write_narrative(rtype: ReportType, fields: Mapping[str, Mapping[str, Any]],
                    differential: Sequence[Mapping[str, Any]] | None = None,
                    flags: Sequence[str] = (), llm: Callable[[str], str] | None = None) -> str:
    """Banner plus a description of the filled fields.

    Args:
        rtype: the report type.
        fields: field name -> entry dict ("value"/"reason", "source", ...).
        differential: lymphoma morphologic differential, best first.
        flags: items for the pathologist's attention.
        llm: optional prompt -> text call; its output is used when non-empty text.
    """
    facts = fact_lines(rtype, fields, differential)
    body = ""
    if llm is not None and facts:
        prompt = ("Write a short microscopic description for a draft pathology report "
                  f"({rtype.title}). Use only these findings; add nothing else:\n- "
                  + "\n- ".join(facts))
        out = llm(prompt)
        if isinstance(out, str) and out.strip():
            body = out.strip()
        else:
            log.warning("narrative LLM returned no text; using the template")
    if not body:
        if facts:
            body = f"{rtype.title}. " + " ".join(f"{line}." for line in facts)
        else:
            body = f"{rtype.title}. No field could be filled from the submitted material."
    open_count = sum(1 for e in fields.values() if e.get("value") is None)
    tail = f" {open_count} field(s) remain open, each with its reason." if open_count else ""
    flag_text = (" Flags: " + " ".join(f"[{f}]" for f in flags)) if flags else ""
    return f"{BANNER}\n\n{body}{tail}{flag_text}"
