"""hybridlm: hybrid Gated DeltaNet / attention language models (Olmo Hybrid, arXiv 2604.03444)."""

from hybridlm.models import HybridCache, HybridConfig, HybridLM, get_preset, preset_names
from hybridlm.ops import gated_delta_rule

__version__ = "0.1.0"

__all__ = ["HybridCache", "HybridConfig", "HybridLM", "gated_delta_rule", "get_preset", "preset_names"]
