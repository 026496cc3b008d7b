"""Structured report drafts: schemas, drafting from image findings and case data, renderers."""

from __future__ import annotations

from pathvlm.reports.draft import draft_report
from pathvlm.reports.fhir import to_fhir, validate_fhir
from pathvlm.reports.fields import Assess, FieldSpec, Reason, Req, Source
from pathvlm.reports.findings import ImageFindings, SlideFindings
from pathvlm.reports.render import list_formats, render_report
from pathvlm.reports.schemas import (
    BANNER,
    ReportBase,
    get_report_type,
    list_report_types,
    report_json_schema,
    report_model,
    validate_report,
)

Report = ReportBase

__all__ = [
    "BANNER", "Assess", "FieldSpec", "ImageFindings", "Reason", "Report", "Req", "SlideFindings",
    "Source", "draft_report", "get_report_type", "list_formats", "list_report_types",
    "render_report", "report_json_schema", "report_model", "to_fhir", "validate_fhir",
    "validate_report",
]
