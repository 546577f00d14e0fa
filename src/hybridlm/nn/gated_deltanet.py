"""The Gated DeltaNet token mixer of Olmo Hybrid (`linear_attn` in the checkpoints).

Per token: q, k, v projections -> depthwise causal conv (kernel 4) + SiLU -> head split;
beta = sigmoid(b) (times 2 with negative eigenvalues); log decay g = -exp(A_log) * softplus(a + dt_bias)
in float32; the gated delta rule with L2-normalised q, k; a gated RMSNorm (eps 1e-5, weight shared
by heads, SiLU gate from g_proj) and the output projection.

`forward` is the reference path (training, prefill, any length). `decode` is the fused one-token
step for generation: q/k/v in one matmul and a/b in another (derived weights, see
`hybridlm.nn.inference`), and on GPUs the Triton conv and recurrent kernels that advance the
decoding state in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.nn.inference import HasInferenceWeights
from hybridlm.nn.norm import GatedRMSNorm
from hybridlm.ops import gated_delta_rule
from hybridlm.ops.conv import causal_conv1d
from hybridlm.ops.gated_delta_rule.triton.backend import prefers_triton


@dataclass
class GDNState:
    """Decoding state of one GDN layer.

    conv_state: [B, 2*key_dim + value_dim, W-1], the last W-1 pre-conv inputs (channels q | k | v).
    recurrent_state: [B, HV, K, V] float32.
    """

    conv_state: torch.Tensor
    recurrent_state: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv_state, self.recurrent_state))


class ShortConvolution(nn.Module):
    """Holds a depthwise causal conv weight [C, 1, W] under the checkpoint name `<name>.weight`."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        # nn.Conv1d's default initialisation (fla's ShortConvolution is an nn.Conv1d).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))


class GatedDeltaNet(HasInferenceWeights, nn.Module):
    def __init__(
        self,
        d_model: int,
        *,
        key_heads: int,
        value_heads: int,
        key_head_dim: int,
        value_head_dim: int,
        conv_size: int = 4,
        neg_eigval: bool = True,
        use_decay: bool = True,
        use_output_gate: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.key_heads = key_heads
        self.value_heads = value_heads
        self.key_head_dim = key_head_dim
        self.value_head_dim = value_head_dim
        self.key_dim = key_heads * key_head_dim
        self.value_dim = value_heads * value_head_dim
        self.conv_size = conv_size
        self.neg_eigval = neg_eigval
        self.use_decay = use_decay
        self.use_output_gate = use_output_gate

        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        if use_decay:
            self.a_proj = nn.Linear(d_model, value_heads, bias=False)
            self.A_log = nn.Parameter(torch.zeros(value_heads))
            self.dt_bias = nn.Parameter(torch.zeros(value_heads))
        self.b_proj = nn.Linear(d_model, value_heads, bias=False)
        if use_output_gate:
            self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.q_conv1d = ShortConvolution(self.key_dim, conv_size)
        self.k_conv1d = ShortConvolution(self.key_dim, conv_size)
        self.v_conv1d = ShortConvolution(self.value_dim, conv_size)
        self.o_norm = GatedRMSNorm(value_head_dim, eps=norm_eps)

    @property
    def conv_channels(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def _inference_sources(self) -> list[torch.Tensor]:
        sources = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.b_proj.weight]
        sources += [self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]
        if self.use_decay:
            sources += [self.a_proj.weight, self.A_log, self.dt_bias]
        return sources

    def _build_inference_weights(self) -> dict[str, torch.Tensor]:
        """qkv_proj [2*key_dim + value_dim, d_model]: q|k|v projections stacked (the conv's input
        channels in order); ab_proj [(2 or 1)*HV, d_model]: a|b (or b alone without decay);
        conv_weight [C, W]; neg_decay_rate = -exp(A_log) and dt_bias [HV] in the gate dtype."""
        weights = {
            "qkv_proj": torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]),
            "conv_weight": torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight]).squeeze(1),
            "ab_proj": torch.cat([self.a_proj.weight, self.b_proj.weight]) if self.use_decay else self.b_proj.weight,
        }
        if self.use_decay:
            gate_dtype = torch.promote_types(self.A_log.dtype, torch.float32)
            weights["neg_decay_rate"] = -self.A_log.to(gate_dtype).exp()
            weights["dt_bias"] = self.dt_bias.to(gate_dtype)
        return weights

    def init_state(self, batch: int, *, device, dtype) -> GDNState:
        """A zero decoding state (conv state in the activation dtype, recurrent state in float32)."""
        return GDNState(
            conv_state=torch.zeros(batch, self.conv_channels, self.conv_size - 1, device=device, dtype=dtype),
            recurrent_state=torch.zeros(
                batch, self.value_heads, self.key_head_dim, self.value_head_dim, device=device, dtype=torch.float32
            ),
        )

    @torch.no_grad()
    def reset_gates(self, a_log_range: tuple[float, float], dt_range: tuple[float, float], dt_floor: float) -> None:
        """The reference initialisation of A_log and dt_bias (fla, transformers, OLMo-core)."""
        if not self.use_decay:
            return
        a = torch.empty_like(self.A_log, dtype=torch.float32).uniform_(*a_log_range)
        self.A_log.copy_(a.log())
        low, high = math.log(dt_range[0]), math.log(dt_range[1])
        dt = torch.exp(torch.rand_like(self.dt_bias, dtype=torch.float32) * (high - low) + low).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(
        self,
        x: torch.Tensor,
        *,
        padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        state: GDNState | None = None,
        impl: str = "auto",
    ) -> torch.Tensor:
        """x: [B, T, d_model] (already normed) -> [B, T, d_model].

        padding_mask: [B, T] bool, True for real tokens. Padded positions are made exact no-ops:
            their inputs are zeroed (so they add nothing to a conv window) and their beta and decay
            are neutralised (so the recurrent state passes through unchanged).
        cu_seqlens: [N+1] document offsets over the flattened B*T tokens (packed documents); the conv
            and the recurrence restart at every boundary. Not combined with `state`.
        state: decoding state, updated in place (prefill of any length, or one-token decode).
        """
        batch, seq_len, _ = x.shape
        if padding_mask is not None:
            x = x * padding_mask[:, :, None].to(x.dtype)
        derived = None if torch.is_grad_enabled() else self.prepared_inference_weights()
        if derived is not None:  # inference after HybridLM.prepare_for_inference: one matmul, no concat
            mixed, conv_weight = F.linear(x, derived["qkv_proj"]), derived["conv_weight"]
        else:
            # One matmul over the stacked weights: the conv reads [B, T, C] contiguous, with no
            # copy of the three projections into it (nor of their gradients out of it).
            mixed = F.linear(x, torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
            conv_weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], dim=0)
        # Gates in float32 (float64 when the model runs in float64, for gradient checks).
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        beta = torch.sigmoid(self.b_proj(x).to(gate_dtype))
        if self.neg_eigval:
            beta = beta * 2.0
        if self.use_decay:
            a = self.a_proj(x).to(gate_dtype)
            g = -self.A_log.to(gate_dtype).exp() * F.softplus(a + self.dt_bias.to(gate_dtype))
        else:
            g = torch.zeros_like(beta)
        if padding_mask is not None:
            keep = padding_mask[:, :, None].to(beta.dtype)
            beta = beta * keep
            g = g * keep

        if cu_seqlens is not None:
            if state is not None:
                raise ValueError("packed documents (cu_seqlens) cannot be combined with a decoding state")
            flat = (1, batch * seq_len)
            mixed, _ = causal_conv1d(mixed.reshape(*flat, -1), conv_weight, cu_seqlens=cu_seqlens)
            beta, g = beta.reshape(flat + (-1,)), g.reshape(flat + (-1,))
            initial_recurrent = None
        else:
            mixed, conv_final = causal_conv1d(
                mixed,
                conv_weight,
                initial_state=None if state is None else state.conv_state,
                output_final_state=state is not None,
            )
            initial_recurrent = None if state is None else state.recurrent_state
        q, k, v = self._split_heads(mixed)
        out, final_recurrent = gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=initial_recurrent,
            output_final_state=state is not None,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm=True,
            impl=impl,
        )
        if state is not None:
            state.conv_state.copy_(conv_final)
            state.recurrent_state.copy_(final_recurrent)
        out = out.reshape(batch, seq_len, self.value_heads, self.value_head_dim)
        gate = None
        if self.use_output_gate:
            gate = self.g_proj(x).reshape(batch, seq_len, self.value_heads, self.value_head_dim)
        out = self.o_norm(out, gate)
        return self.o_proj(out.reshape(batch, seq_len, self.value_dim))

    def _split_heads(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, 2*key_dim + value_dim] -> q, k [B, T, H, K] and v [B, T, HV, V] (views)."""
        q, k, v = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(*q.shape[:2], self.key_heads, self.key_head_dim)
        k = k.reshape(*k.shape[:2], self.key_heads, self.key_head_dim)
        v = v.reshape(*v.shape[:2], self.value_heads, self.value_head_dim)
        return q, k, v

    def decode(self, x: torch.Tensor, state: GDNState, *, impl: str = "auto") -> torch.Tensor:
        """One decoding step, fused: x [B, 1, d_model] (already normed) -> [B, 1, d_model].

        Equal to `forward(x, state=state, impl=impl)` up to float rounding, in fewer kernels: q/k/v
        and a/b each in one matmul with the derived weights (`inference_weights()`), gate constants
        precomputed. With the Triton kernels (impl "triton-split" or "triton", or "auto" on a GPU) the conv and the
        recurrence advance `state` in place (`causal_conv1d_update_`, `gated_delta_rule_decode_`);
        otherwise the reference ops run and their final states are copied into `state`.
        No padding mask: every row advances. Without gradients (derived weights are detached).
        """
        weights = self.inference_weights()
        batch = x.shape[0]
        mixed = F.linear(x, weights["qkv_proj"])
        gate_dtype = torch.promote_types(x.dtype, torch.float32)
        ab = F.linear(x, weights["ab_proj"]).to(gate_dtype)
        if self.use_decay:
            a, b = ab.split(self.value_heads, dim=-1)
            g = weights["neg_decay_rate"].to(gate_dtype) * F.softplus(a + weights["dt_bias"].to(gate_dtype))
        else:
            b = ab
        beta = torch.sigmoid(b)
        if self.neg_eigval:
            beta = beta * 2.0
        if not self.use_decay:
            g = torch.zeros_like(beta)

        if impl in ("triton", "triton-split") or (impl == "auto" and prefers_triton(x, False)):
            from hybridlm.ops.gated_delta_rule.triton import gated_delta_rule_decode_
            from hybridlm.ops.triton.conv import causal_conv1d_update_

            mixed = causal_conv1d_update_(mixed, weights["conv_weight"], state.conv_state)
            q, k, v = self._split_heads(mixed)
            out = gated_delta_rule_decode_(q, k, v, g, beta, state.recurrent_state, use_qk_l2norm=True)
        else:
            mixed, conv_final = causal_conv1d(
                mixed, weights["conv_weight"], initial_state=state.conv_state, output_final_state=True
            )
            q, k, v = self._split_heads(mixed)
            out, final_recurrent = gated_delta_rule(
                q, k, v, g, beta,
                initial_state=state.recurrent_state, output_final_state=True, use_qk_l2norm=True, impl=impl,
            )
            state.conv_state.copy_(conv_final)
            state.recurrent_state.copy_(final_recurrent)
        gate = None
        if self.use_output_gate:
            gate = self.g_proj(x).reshape(batch, 1, self.value_heads, self.value_head_dim)
        out = self.o_norm(out, gate)
        return self.o_proj(out.reshape(batch, 1, self.value_dim))
