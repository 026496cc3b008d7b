"""Report type registry and the pydantic models (and JSON Schemas) built from the field tables.

Every report is `{"report_type", "draft": true, "fields": {...}, ...}`; each field entry holds a
value from its enumeration or a no-value reason, never both, plus confidence, evidence and
provenance. The models enforce provenance, so a report that validates cannot carry an ancillary
field filled from the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from pathvlm.errors import ConfigError
from pathvlm.reports import tables
from pathvlm.reports.fields import FieldSpec, Reason, Source

BANNER = "DRAFT - requires review by a pathologist"


@dataclass(frozen=True)
class ReportType:
    name: str
    title: str
    fields: tuple[FieldSpec, ...]
    has_differential: bool = False

    def spec(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


_REGISTRY: dict[str, ReportType] = {
    "colorectal_resection": ReportType(
        "colorectal_resection", "Colon and rectum carcinoma, resection",
        tables.COLORECTAL_RESECTION),
    "colorectal_biopsy": ReportType(
        "colorectal_biopsy", "Colon and rectum carcinoma, biopsy / polypectomy",
        tables.COLORECTAL_BIOPSY),
    "lymphoma": ReportType("lymphoma", "Lymphoma, biopsy or excision", tables.LYMPHOMA,
                           has_differential=True),
}


def list_report_types() -> list[str]:
    """Names of the registered report types (the list the CLI and tests read)."""
    return list(_REGISTRY)


def get_report_type(name: str) -> ReportType:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown report type {name!r}; choose one of {', '.join(_REGISTRY)}") from None


class Evidence(BaseModel):
    """Where in the images a value came from."""

    model_config = ConfigDict(extra="forbid")
    slide: str
    tiles: list[tuple[int, int]] = Field(default_factory=list, description="level-0 (x, y)")
    heatmap: str | None = None


class Considered(BaseModel):
    """A value the model weighed for a field, with its probability."""

    model_config = ConfigDict(extra="forbid")
    value: Any
    probability: float = Field(ge=0.0, le=1.0)


class FieldEntry(BaseModel):
    """Base of every field entry: exactly one of value and reason."""

    model_config = ConfigDict(extra="forbid")
    reason: Reason | None = None
    confidence: float | None = Field(default=None, ge=0.0, le=1.0)
    evidence: list[Evidence] = Field(default_factory=list)
    source: Source | None = None
    note: str | None = None
    considered: list[Considered] | None = Field(
        default=None, description="values weighed with their probabilities, best first (an "
        "abstaining field lists what it did not fill)")

    @model_validator(mode="after")
    def _value_xor_reason(self) -> FieldEntry:
        value = getattr(self, "value", None)
        if (value is None) == (self.reason is None):
            raise ValueError("a field holds exactly one of 'value' and 'reason'")
        if value is not None and self.source is None:
            raise ValueError("a filled field needs its 'source'")
        if value is None and (self.evidence or self.confidence is not None):
            raise ValueError("an abstaining field carries no confidence or evidence")
        return self


class DifferentialEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entity: str
    probability: float = Field(ge=0.0, le=1.0)
    confirm_with: list[str]
    status: str = "morphologic impression only - requires ancillary testing"
    supported_by: list[str] = Field(default_factory=list)
    contradicted_by: list[str] = Field(default_factory=list)
    evidence: list[Evidence] = Field(default_factory=list,
                                     description="tiles that most support this entity")


def _value_type(spec: FieldSpec) -> Any:
    if spec.kind == "enum":
        return Literal[spec.values]  # type: ignore[valid-type]
    if spec.kind == "multi_enum":
        return list[Literal[spec.values]]  # type: ignore[valid-type]
    return {"number": float, "integer": int, "string": str}[spec.kind]


def _entry_model(report: str, spec: FieldSpec) -> type[FieldEntry]:
    vtype = _value_type(spec)
    kwargs: dict[str, Any] = {}
    if spec.kind in ("number", "integer"):
        kwargs["ge"] = 0
    if spec.kind == "multi_enum":
        kwargs["min_length"] = 1
    value = (vtype | None, Field(default=None, **kwargs))
    model = create_model(
        f"{report}__{spec.name}", __base__=FieldEntry, value=value,
        __doc__=f"{spec.label} [{spec.assess.value}, {spec.req.value}]")
    model.model_config["json_schema_extra"] = {
        "x-assess": spec.assess.value, "x-requirement": spec.req.value,
        "x-sources": sorted(s.value for s in spec.sources)}
    model.model_rebuild(force=True)
    return model


class ReportBase(BaseModel):
    """Fields shared by every report type; a case adds, never renames."""

    model_config = ConfigDict(extra="forbid")
    draft: Literal[True] = True
    narrative: str
    model: str
    generated_at: str
    # pathvlm_version, weights_hash, git_commit (pathvlm.provenance); unknown ones are absent
    provenance: dict[str, str] | None = None
    banner: Literal[BANNER] = BANNER  # type: ignore[valid-type]
    flags: list[str] = Field(default_factory=list)
    case_id: str | None = None
    slides: list[dict[str, Any]] | None = None
    ancillary_results: list[dict[str, Any]] | None = None
    min_confidence: float | None = Field(
        default=None, ge=0.0, description="threshold in force: an image-decided field holds a "
        "value only when its calibrated probability is at least this (null: none may)")
    calibration: dict[str, Any] | None = None
    tissue_composition: dict[str, Any] | None = None
    narrative_source: Literal["template", "llm"] = "template"

    @model_validator(mode="after")
    def _provenance(self) -> ReportBase:
        rtype = get_report_type(self.report_type)  # type: ignore[attr-defined]
        for spec in rtype.fields:
            entry = getattr(self.fields, spec.name)  # type: ignore[attr-defined]
            if entry.value is None:
                continue
            if entry.source not in spec.sources:
                raise ValueError(f"field {spec.name} ({spec.assess.value}) cannot come from "
                                 f"source {entry.source.value!r}")
            if (entry.source == Source.image and spec.image_values
                    and entry.value not in spec.image_values):
                raise ValueError(f"field {spec.name}: {entry.value!r} needs ancillary "
                                 "confirmation and cannot come from the image")
        if "narrative" in type(self).model_fields and BANNER not in self.narrative:
            raise ValueError("the narrative must carry the draft banner")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON contract: field entries show 'value' or 'reason', never both keys."""
        data = self.model_dump(mode="json", exclude_none=False)
        for entry in data["fields"].values():
            entry.pop("reason" if entry.get("value") is not None else "value")
            for key in ("note", "considered"):
                if entry.get(key) is None:
                    entry.pop(key, None)
        for key in ("case_id", "slides", "ancillary_results", "provenance", "calibration",
                    "tissue_composition"):
            if data.get(key) is None:
                data.pop(key)
        return data


@cache
def report_model(name: str) -> type[ReportBase]:
    """The pydantic model of report type `name` (cached; one class per type)."""
    rtype = get_report_type(name)
    entries = {s.name: (_entry_model(name, s), ...) for s in rtype.fields}
    fields_model = create_model(f"{name}__fields", __config__=ConfigDict(extra="forbid"),
                                **entries)
    extra: dict[str, Any] = {
        "report_type": (Literal[name], name),  # type: ignore[valid-type]
        "fields": (fields_model, ...),
    }
    if rtype.has_differential:
        extra["morphologic_differential"] = (list[DifferentialEntry], ...)
    return create_model(f"{name}_report", __base__=ReportBase, **extra)


def report_json_schema(name: str) -> dict[str, Any]:
    """JSON Schema of report type `name`."""
    schema = report_model(name).model_json_schema()
    schema["title"] = get_report_type(name).title
    return schema


def validate_report(data: dict[str, Any]) -> ReportBase:
    """Parse a report JSON dict (as written by the JSON renderer) back into its model."""
    name = data.get("report_type") if isinstance(data, dict) else None
    if not isinstance(name, str):
        raise ConfigError("report JSON has no 'report_type'")
    return report_model(name).model_validate(data)
