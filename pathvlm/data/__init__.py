"""Training data: formats (pairs JSONL, chat JSONL, MIL CSV), class descriptions and builders."""

from pathvlm.data.builders import BuildConfig, build_datasets, read_index
from pathvlm.data.classes import ClassInfo, ClassSet, load_class_set
from pathvlm.data.formats import (
    read_conversations,
    read_jsonl,
    read_mil_csv,
    read_pairs,
    write_jsonl,
)

__all__ = [
    "BuildConfig", "ClassInfo", "ClassSet", "build_datasets", "load_class_set", "read_conversations",
    "read_index", "read_jsonl", "read_mil_csv", "read_pairs", "write_jsonl",
]
