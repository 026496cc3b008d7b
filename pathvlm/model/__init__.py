"""Aggregators, projectors, LLM loading and the PathVLM chat model."""

from pathvlm.model.aggregators import create_aggregator, list_aggregators
from pathvlm.model.llm import load_llm, load_tokenizer
from pathvlm.model.loading import list_models, load_model
from pathvlm.model.projectors import create_projector, list_projectors
from pathvlm.model.vlm import GenerationConfig, ModelConfig, PathVLM, build_model

__all__ = [
    "GenerationConfig",
    "ModelConfig",
    "PathVLM",
    "build_model",
    "create_aggregator",
    "create_projector",
    "list_aggregators",
    "list_models",
    "list_projectors",
    "load_llm",
    "load_model",
    "load_tokenizer",
]
