"""Evaluation harness: zero-shot, linear probe, few-shot, closed-form VQA; JSON + Markdown reports."""

from pathvlm.eval.datasets import LabeledDataset, load_dataset, match_classes
from pathvlm.eval.metrics import bootstrap_ci, classification_metrics, expected_calibration_error

__all__ = [
    "LabeledDataset",
    "bootstrap_ci",
    "classification_metrics",
    "expected_calibration_error",
    "load_dataset",
    "match_classes",
]
