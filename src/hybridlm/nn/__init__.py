"""Layers: thin modules over the operators in `hybridlm.ops`."""

from hybridlm.nn.attention import Attention, KVCache, build_attention_mask
from hybridlm.nn.blocks import AttentionBlock, GatedDeltaNetBlock
from hybridlm.nn.gated_deltanet import GatedDeltaNet, GDNState
from hybridlm.nn.mlp import SwiGLU
from hybridlm.nn.norm import GatedRMSNorm, RMSNorm
from hybridlm.nn.rope import RotaryEmbedding, apply_rotary

__all__ = [
    "Attention",
    "AttentionBlock",
    "GDNState",
    "GatedDeltaNet",
    "GatedDeltaNetBlock",
    "GatedRMSNorm",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary",
    "build_attention_mask",
]
