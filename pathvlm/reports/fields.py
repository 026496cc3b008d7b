"""Field specifications: allowed values, assessability and requirement of one report field.

A `FieldSpec` is the single source of truth for a field; the pydantic models, drafting,
renderers and tests all read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Assess(str, Enum):
    """What the assistant may fill a field from (codes of report_fields.md)."""

    HE = "HE"  # H&E image alone
    HE_CTX = "HE+ctx"  # H&E, but only with specimen context
    GC = "GC"  # gross and/or clinical information
    ANC = "ANC"  # ancillary testing
    DER = "DER"  # derived from other fields


class Req(str, Enum):
    CORE = "CORE"
    COND = "COND"
    OPT = "OPT"
    EXT = "EXT"


class Reason(str, Enum):
    """Why a field holds no value; the assistant writes one of these instead of guessing."""

    requires_ancillary_testing = "requires_ancillary_testing"
    requires_gross_or_clinical_information = "requires_gross_or_clinical_information"
    cannot_be_determined_from_submitted_tissue = "cannot_be_determined_from_submitted_tissue"
    not_applicable = "not_applicable"


class Source(str, Enum):
    image = "image"
    clinical = "clinical"
    ancillary_result = "ancillary_result"
    derived = "derived"


KINDS = ("enum", "multi_enum", "number", "integer", "string")

# which provenances each assessability admits; a pathologist's entry (clinical) may always
# state what the image could show, but nothing else may fill ANC, GC or DER fields
_SOURCES = {
    Assess.HE: frozenset({Source.image, Source.clinical}),
    Assess.HE_CTX: frozenset({Source.image, Source.clinical}),
    Assess.GC: frozenset({Source.clinical}),
    Assess.ANC: frozenset({Source.ancillary_result}),
    Assess.DER: frozenset({Source.derived}),
}

# the reason a field gets when nothing could fill it, by assessability
DEFAULT_REASON = {
    Assess.HE: Reason.cannot_be_determined_from_submitted_tissue,
    Assess.HE_CTX: Reason.requires_gross_or_clinical_information,
    Assess.GC: Reason.requires_gross_or_clinical_information,
    Assess.ANC: Reason.requires_ancillary_testing,
    Assess.DER: Reason.cannot_be_determined_from_submitted_tissue,
}


@dataclass(frozen=True)
class FieldSpec:
    """One report field.

    Attributes:
        name: snake_case key in the JSON report.
        label: human-readable name.
        kind: one of `KINDS`.
        values: allowed values for enum and multi_enum fields.
        assess: what may fill it.
        req: CAP requirement (plus EXT for fields added for the assistant).
        condition: when a COND field applies, in words.
        unit: UCUM unit of a number field.
        image_values: for HE fields where some values need more than H&E (e.g. neuroendocrine
            carcinoma needs ancillary confirmation), the subset the image may give; empty = all.
    """

    name: str
    label: str
    kind: str
    values: tuple[str, ...] = ()
    assess: Assess = Assess.HE
    req: Req = Req.CORE
    condition: str = ""
    unit: str = ""
    image_values: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name}: unknown kind {self.kind!r}")
        if (self.kind in ("enum", "multi_enum")) != bool(self.values):
            raise ValueError(f"field {self.name}: enum fields (only) need allowed values")

    @property
    def sources(self) -> frozenset[Source]:
        return _SOURCES[self.assess]

    @property
    def default_reason(self) -> Reason:
        return DEFAULT_REASON[self.assess]

    def coerce(self, raw: Any) -> Any:
        """Return `raw` as a valid value of this field, or raise ValueError saying why.

        Accepts exact allowed values, case-insensitive matches, and for multi_enum a list or a
        ';'-separated string. Anything else (wrong type, NaN, out of enumeration) is rejected.
        """
        if self.kind == "enum":
            return self._one_of(raw)
        if self.kind == "multi_enum":
            items = raw.split(";") if isinstance(raw, str) else raw
            if not isinstance(items, (list, tuple)) or not items:
                raise ValueError(f"{self.name}: expected a non-empty list, got {raw!r}")
            out: list[str] = []
            for item in items:
                value = self._one_of(item.strip() if isinstance(item, str) else item)
                if value not in out:
                    out.append(value)
            return out
        if self.kind in ("number", "integer"):
            if isinstance(raw, bool):
                raise ValueError(f"{self.name}: expected a number, got {raw!r}")
            if isinstance(raw, str):
                try:
                    raw = float(raw.strip())
                except ValueError:
                    raise ValueError(f"{self.name}: expected a number, got {raw!r}") from None
            if not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw < 0:
                raise ValueError(f"{self.name}: expected a finite number >= 0, got {raw!r}")
            if self.kind == "integer":
                if float(raw) != int(raw):
                    raise ValueError(f"{self.name}: expected a whole number, got {raw!r}")
                return int(raw)
            return float(raw)
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"{self.name}: expected non-empty text, got {raw!r}")
        return raw.strip()

    def _one_of(self, raw: Any) -> str:
        if isinstance(raw, str):
            if raw in self.values:
                return raw
            folded = {v.casefold(): v for v in self.values}
            hit = folded.get(raw.strip().casefold())
            if hit is not None:
                return hit
        raise ValueError(f"{self.name}: {raw!r} is not one of the allowed values")
