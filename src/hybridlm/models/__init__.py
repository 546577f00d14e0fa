"""The model family: `HybridConfig`, `HybridLM`, presets and the decoding cache."""

from hybridlm.models.cache import HybridCache
from hybridlm.models.config import HybridConfig, layer_kinds_from_pattern
from hybridlm.models.hybrid_lm import CausalLMOutput, HybridLM, cu_seqlens_from_doc_ids
from hybridlm.models.presets import FAMILIES, SIZES, get_preset, preset_names

__all__ = [
    "FAMILIES",
    "SIZES",
    "CausalLMOutput",
    "HybridCache",
    "HybridConfig",
    "HybridLM",
    "cu_seqlens_from_doc_ids",
    "get_preset",
    "layer_kinds_from_pattern",
    "preset_names",
]
