"""Generation: the decoding engine (prefill + CUDA-graph decode), sampling and streaming text."""

from hybridlm.generate.engine import GenerationOutput, GenerationStats, Generator, generate, prepare_prompts
from hybridlm.generate.sampling import SamplingConfig, sample_next_token
from hybridlm.generate.text import IncrementalDetokenizer

__all__ = [
    "GenerationOutput",
    "GenerationStats",
    "Generator",
    "IncrementalDetokenizer",
    "SamplingConfig",
    "generate",
    "prepare_prompts",
    "sample_next_token",
]
