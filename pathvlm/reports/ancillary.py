"""Ancillary results entered by the pathologist: the marker vocabulary and table-driven rules.

Lymphoma rules (report_fields.md, B and D) say which results support, establish or contradict
an entity; conflicts are flagged, never resolved. Colorectal biomarkers map results onto the A3
fields (loss of any MMR protein -> MMR-deficient).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pathvlm.reports.tables import ENTITY_PANELS

TESTS = ("IHC", "FISH", "ISH", "PCR", "NGS", "flow", "MMR", "MSI", "clonality", "cytogenetics")
RESULTS = ("positive", "negative", "equivocal", "weak", "loss", "intact", "value")

# canonical target -> aliases (compared casefolded with spaces, '-' and '_' removed)
TARGETS: dict[str, tuple[str, ...]] = {
    **{m: () for m in (
        "CD3", "CD4", "CD5", "CD8", "CD10", "CD15", "CD19", "CD20", "CD21", "CD23", "CD30",
        "CD45", "CD79a", "CD138", "BCL2", "BCL6", "LEF1", "SOX11", "PAX5", "MUM1", "ALK", "TdT",
        "OCT2", "BOB1", "kappa", "lambda", "MYC", "EBER", "IGH", "TCR",
        "MLH1", "PMS2", "MSH2", "MSH6", "MSI", "KRAS", "NRAS", "PIK3CA", "PTEN", "HER2",
        "pan-cytokeratin", "CK20", "CK7", "CDX2", "SATB2", "chromogranin", "synaptophysin")},
    "cyclin D1": ("ccnd1", "cyclind1", "bcl1"),
    "Ki-67": ("ki67", "mib1"),
    "BRAF V600E": ("braf", "brafv600e", "v600e"),
    "MLH1 promoter methylation": ("mlh1methylation", "mlh1promotermethylation"),
    "t(14;18)": ("t1418", "igh::bcl2", "ighbcl2"),
    "t(11;14)": ("t1114", "ccnd1::igh", "ccnd1igh"),
    "MYC rearrangement": ("mycrearrangement", "mycbreakapart"),
    "BCL2 rearrangement": ("bcl2rearrangement", "bcl2breakapart"),
    "BCL6 rearrangement": ("bcl6rearrangement", "bcl6breakapart"),
}


def _fold(text: str) -> str:
    return re.sub(r"[\s_\-()]", "", text).casefold()


_TARGET_INDEX = {_fold(k): k for k in TARGETS} | {
    _fold(a): k for k, aliases in TARGETS.items() for a in aliases}
_TEST_INDEX = {t.casefold(): t for t in TESTS}


def canonical_target(name: str) -> str | None:
    """The canonical marker/test target for `name`, or None if it is not known."""
    return _TARGET_INDEX.get(_fold(name))


def canonical_test(name: str) -> str | None:
    return _TEST_INDEX.get(name.strip().casefold())


class ResultLike(Protocol):
    test: str
    target: str
    result: str
    value: Any


def describe(r: ResultLike) -> str:
    shown = f"{r.result} ({r.value})" if r.result == "value" else r.result
    return f"{r.target} {shown} ({r.test})"


def _by_target(results: Iterable[ResultLike]) -> dict[str, ResultLike]:
    # the last entry for a target wins, as on a worksheet where a repeat replaces the first
    return {canonical_target(r.target) or r.target: r for r in results}


@dataclass(frozen=True)
class Cond:
    target: str
    results: frozenset[str]

    def holds(self, found: dict[str, ResultLike]) -> bool:
        r = found.get(self.target)
        return r is not None and r.result in self.results


def _c(target: str, *results: str) -> Cond:
    return Cond(target, frozenset(results))


@dataclass(frozen=True)
class Rule:
    """Results that support an entity: all of `all_of` and (if given) one of `any_of`.

    `establishes` says whether a supported rule may fill the WHO entity (when nothing conflicts
    and every `establish_also` holds); otherwise it only re-ranks the differential.
    """

    entity: str
    text: str
    all_of: tuple[Cond, ...] = ()
    any_of: tuple[Cond, ...] = ()
    establishes: bool = False
    establish_also: tuple[Cond, ...] = ()
    lineage: str = "B-cell"

    def matches(self, found: dict[str, ResultLike]) -> list[str]:
        """Descriptions of the results that satisfy the rule, or [] if it does not hold."""
        if not all(c.holds(found) for c in self.all_of):
            return []
        hits = [c for c in self.any_of if c.holds(found)]
        if self.any_of and not hits:
            return []
        return [describe(found[c.target]) for c in (*self.all_of, *hits)]


MCL, CLL = "Mantle cell lymphoma", "Chronic lymphocytic leukaemia/small lymphocytic lymphoma"
FL, CHL = "Follicular lymphoma", "Classic Hodgkin lymphoma"
POS = "positive"

RULES: tuple[Rule, ...] = (
    Rule(MCL, "cyclin D1 positive or t(11;14) supports mantle cell lymphoma",
         any_of=(_c("cyclin D1", POS), _c("t(11;14)", POS)), establishes=True),
    Rule(MCL, "SOX11 positive supports mantle cell lymphoma", all_of=(_c("SOX11", POS),)),
    Rule(CLL, "CD5 and CD23 positive supports CLL/SLL",
         all_of=(_c("CD5", POS), _c("CD23", POS)), establishes=True,
         establish_also=(_c("cyclin D1", "negative"),)),
    Rule(FL, "CD10 or BCL6 positive with BCL2 positive supports follicular lymphoma",
         all_of=(_c("BCL2", POS),), any_of=(_c("CD10", POS), _c("BCL6", POS)), establishes=True),
    Rule(FL, "t(14;18) supports follicular lymphoma", all_of=(_c("t(14;18)", POS),)),
    Rule(CHL, "CD30 and CD15 positive with weak PAX5 supports classic Hodgkin lymphoma",
         all_of=(_c("CD30", POS), _c("CD15", POS), _c("PAX5", "weak")), establishes=True,
         lineage="Hodgkin (classic)"),
)

# results that argue against an entity (any one suffices)
AGAINST: dict[str, tuple[Cond, ...]] = {
    MCL: (_c("cyclin D1", "negative"),),
    CLL: (_c("CD5", "negative"), _c("CD23", "negative")),
    FL: (_c("CD10", "negative"),),
    CHL: (_c("CD30", "negative"), _c("CD45", POS)),
}
RULE_TARGETS = frozenset(c.target for r in RULES for c in (*r.all_of, *r.any_of))


@dataclass
class LymphomaAssessment:
    supported: dict[str, list[str]] = field(default_factory=dict)
    contradicted: dict[str, list[str]] = field(default_factory=dict)
    established: str | None = None
    established_by: list[str] = field(default_factory=list)
    lineage: str | None = None
    flags: list[str] = field(default_factory=list)


def assess_lymphoma(results: Sequence[ResultLike]) -> LymphomaAssessment:
    """Apply `RULES` and `AGAINST` to entered results; flag conflicts, establish at most one."""
    found = _by_target(results)
    out = LymphomaAssessment()
    establishing: dict[str, list[str]] = {}
    for rule in RULES:
        hits = rule.matches(found)
        if not hits:
            continue
        out.supported.setdefault(rule.entity, []).extend(
            h for h in hits if h not in out.supported.get(rule.entity, []))
        if rule.establishes and all(c.holds(found) for c in rule.establish_also):
            extra = [describe(found[c.target]) for c in rule.establish_also]
            establishing[rule.entity] = hits + extra
            out.lineage = rule.lineage
    for entity, conds in AGAINST.items():
        hits = [describe(found[c.target]) for c in conds if c.holds(found)]
        if hits:
            out.contradicted[entity] = hits
    if len(out.supported) > 1:
        parts = "; ".join(f"{e}: {', '.join(h)}" for e, h in out.supported.items())
        out.flags.append(f"conflicting ancillary results support more than one entity ({parts}); "
                         "not resolved - pathologist review needed")
    for entity in out.supported:
        if entity in out.contradicted:
            out.flags.append(f"results both support and argue against {entity} (for: "
                             f"{', '.join(out.supported[entity])}; against: "
                             f"{', '.join(out.contradicted[entity])}) - pathologist review needed")
    for target, r in found.items():
        if target in RULE_TARGETS and r.result == "equivocal":
            out.flags.append(f"{describe(r)} is equivocal and was not used by the marker rules")
    if len(out.supported) == 1 and not out.flags:
        entity = next(iter(out.supported))
        if entity in establishing:
            out.established, out.established_by = entity, establishing[entity]
            return out
    out.lineage = None
    return out


# colorectal: target -> (field, {result: value})
_MMR = {"loss": "Loss of nuclear expression", "negative": "Loss of nuclear expression",
        "intact": "Intact nuclear expression", "positive": "Intact nuclear expression",
        "equivocal": "Cannot be determined"}
_MUT = {"positive": "Mutation detected", "negative": "No mutation detected",
        "equivocal": "Cannot be determined"}
COLORECTAL_MAP: dict[str, tuple[str, dict[str, str]]] = {
    "MLH1": ("mlh1_ihc", _MMR), "PMS2": ("pms2_ihc", _MMR), "MSH2": ("msh2_ihc", _MMR),
    "MSH6": ("msh6_ihc", _MMR),
    "BRAF V600E": ("braf_v600e", {"positive": "Mutation detected (V600E)",
                                  "negative": "No mutation detected",
                                  "equivocal": "Cannot be determined"}),
    "KRAS": ("kras_status", _MUT), "NRAS": ("nras_status", _MUT),
    "PIK3CA": ("pik3ca_status", _MUT),
    "PTEN": ("pten_ihc", {"intact": "Intact", "positive": "Intact", "loss": "Loss",
                          "negative": "Loss", "equivocal": "Cannot be determined"}),
    "MLH1 promoter methylation": ("mlh1_promoter_methylation", {
        "positive": "Methylated", "negative": "Unmethylated", "equivocal": "Cannot be determined"}),
}
_VALUE_FIELDS = {"MSI": ("msi_status", ("MSS", "MSI-L", "MSI-H")),
                 "HER2": ("her2_ihc", ("0", "1+", "2+", "3+"))}


@dataclass
class Filled:
    """A field value established by entered results, naming them."""

    value: Any
    results: list[str]


def colorectal_fields(results: Sequence[ResultLike]) -> tuple[dict[str, Filled], list[str]]:
    """Biomarker fields filled from entered results, and flags for results that fit no field."""
    filled: dict[str, Filled] = {}
    flags: list[str] = []
    for target, r in _by_target(results).items():
        if target in COLORECTAL_MAP:
            name, table = COLORECTAL_MAP[target]
            value = table.get(r.result)
        elif target == "HER2" and r.test in ("FISH", "ISH"):
            name = "her2_ish"
            value = {"positive": "Amplified", "negative": "Not amplified",
                     "equivocal": "Equivocal"}.get(r.result)
        elif target in _VALUE_FIELDS:
            name, allowed = _VALUE_FIELDS[target]
            value = str(r.value).strip() if r.result == "value" else None
            value = {v.casefold(): v for v in allowed}.get((value or "").casefold())
        else:
            continue
        if value is None:
            flags.append(f"{describe(r)} does not map onto field {name}; left for the pathologist")
            continue
        filled[name] = Filled(value, [describe(r)])
    proteins = [f for f in ("mlh1_ihc", "pms2_ihc", "msh2_ihc", "msh6_ihc") if f in filled]
    lost = [f for f in proteins if filled[f].value == "Loss of nuclear expression"]
    if lost:
        filled["mmr_status"] = Filled("MMR-deficient", [r for f in lost for r in filled[f].results])
    elif len(proteins) == 4 and all(filled[f].value == "Intact nuclear expression"
                                    for f in proteins):
        filled["mmr_status"] = Filled("MMR-proficient",
                                      [r for f in proteins for r in filled[f].results])
    msi = filled.get("msi_status")
    mmr = filled.get("mmr_status")
    if msi and mmr and (msi.value == "MSI-H") != (mmr.value == "MMR-deficient"):
        flags.append(f"MMR IHC ({mmr.value}) and MSI testing ({msi.value}) disagree - "
                     "pathologist review needed")
    return filled, flags


_STUDY_TESTS = {"immunophenotyping": ("IHC",), "flow_cytometry": ("flow",),
                "cytogenetics_fish": ("FISH", "cytogenetics"),
                "molecular_genetic_studies": ("PCR", "NGS", "clonality")}
_REARRANGEMENT = {"MYC rearrangement": "myc_rearrangement", "BCL2 rearrangement":
                  "bcl2_rearrangement", "BCL6 rearrangement": "bcl6_rearrangement",
                  "t(14;18)": "bcl2_rearrangement"}


def lymphoma_fields(results: Sequence[ResultLike]) -> tuple[dict[str, Filled], list[str]]:
    """Study-status, EBER, Ki-67 and rearrangement fields filled from entered results."""
    filled: dict[str, Filled] = {}
    flags: list[str] = []
    for name, tests in _STUDY_TESTS.items():
        done = [describe(r) for r in results if canonical_test(r.test) in tests]
        if done:
            filled[name] = Filled("Performed", done)
    for target, r in _by_target(results).items():
        if target == "EBER" and r.result in ("positive", "negative"):
            filled["ebv_eber_ish"] = Filled(r.result.capitalize(), [describe(r)])
        elif target == "Ki-67" and r.result == "value":
            try:
                pct = float(str(r.value).rstrip("%"))
            except ValueError:
                pct = -1.0
            if 0 <= pct <= 100:
                filled["ki67_percent"] = Filled(pct, [describe(r)])
            else:
                flags.append(f"{describe(r)}: Ki-67 needs a percentage 0-100")
        elif target in _REARRANGEMENT and r.result in ("positive", "negative"):
            name = _REARRANGEMENT[target]
            if r.result == "negative" and target == "t(14;18)":
                continue  # other BCL2 partners remain possible
            value = "Rearranged" if r.result == "positive" else "Not rearranged"
            filled[name] = Filled(value, [describe(r)])
    return filled, flags


def confirm_panel(entity: str) -> list[str]:
    """The tests that would confirm `entity` (report_fields.md D)."""
    return list(ENTITY_PANELS.get(entity, ()))
