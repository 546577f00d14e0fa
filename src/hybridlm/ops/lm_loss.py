"""Fused language-model loss: LM head matmul, cross-entropy and z-loss without float32 [N, V] logits.

The unfused loss (`hybridlm.train.loss.language_model_loss_sums` on `F.linear(hidden, weight)`)
copies the bf16 logits to float32 and runs softmax kernels over that copy, forward and backward.
Here the only [N, V] tensor is the logits buffer in the compute dtype:
- forward: the matmul writes it; one pass per row reads it for logsumexp and the target logit;
- backward: one pass per row reads it and overwrites it in place with d(loss)/d(logits), which
  the two gradient matmuls then read.
The per-row passes are Triton kernels (`hybridlm.ops.triton.lm_loss`) or, as the reference and
the CPU fallback, PyTorch over chunks of rows; both do their math in float32.

On an H200 (bf16 autocast, float32 weight, hidden [16384, 2048], V = 100352), forward + backward
took 31.9 ms and peaked at 6.7 GiB, against 76.1 ms and 33.0 GiB for the unfused loss; by their
FLOP count (20 TFLOP at ~790 TFLOP/s), about 25 ms of either is the three matmuls. In hybrid-1b's
compiled training step: 43,613 -> 45,796 tokens/s, peak 74.3 -> 59.2 GB (docs/benchmarks.md).

Label check: labels outside [0, V) other than ignore_index raise ValueError on CPU tensors, where
checking costs no device sync. On GPU the check (one host sync) runs only with the environment
variable HYBRIDLM_CHECK_LABELS=1; unchecked, such a row gives a NaN cross-entropy (never an
out-of-bounds read), so the loss still shows it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
IMPLS = ("auto", "triton", "torch")
# The PyTorch passes hold float32 copies of this many logits at a time (128 MiB): ~330 rows at V ~ 100k.
TORCH_CHUNK_ELEMENTS = 2**25


def _row_chunks(num_rows: int, vocab_size: int):
    step = max(1, TORCH_CHUNK_ELEMENTS // max(vocab_size, 1))
    for start in range(0, num_rows, step):
        yield slice(start, start + step)


def _label_in_range(labels: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(in_range [N] bool, labels with the out-of-range ones replaced by 0, safe to index with)."""
    in_range = (labels >= 0) & (labels < vocab_size)
    return in_range, torch.where(in_range, labels, 0)


def _row_stats_torch(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of `lm_loss_forward_triton`: (logsumexp of each row, row[label] or NaN), float32 [N]."""
    num_rows, vocab_size = logits.shape
    lse = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    for rows in _row_chunks(num_rows, vocab_size):
        lse[rows] = torch.logsumexp(logits[rows].float(), dim=-1)
    in_range, safe_labels = _label_in_range(labels, vocab_size)
    target = logits.gather(1, safe_labels[:, None]).squeeze(1).float()
    return lse, torch.where(in_range, target, float("nan"))


def _gradient_torch_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: torch.Tensor,
    target_scale: torch.Tensor,
) -> None:
    """The reference of `lm_loss_backward_triton_`: logits <- softmax * softmax_scale - target_scale * onehot."""
    num_rows, vocab_size = logits.shape
    in_range, safe_labels = _label_in_range(labels, vocab_size)
    target_term = torch.where(in_range, target_scale, 0.0)
    for rows in _row_chunks(num_rows, vocab_size):
        grad = torch.exp(logits[rows].float() - lse[rows, None]) * softmax_scale[rows, None]
        grad.scatter_add_(1, safe_labels[rows, None], -target_term[rows, None])
        logits[rows].copy_(grad)


def _row_passes(impl: str):
    if impl == "triton":
        from hybridlm.ops.triton.lm_loss import lm_loss_backward_triton_, lm_loss_forward_triton

        return lm_loss_forward_triton, lm_loss_backward_triton_
    return _row_stats_torch, _gradient_torch_


class _FusedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, compute_dtype, impl):
        row_stats, _ = _row_passes(impl)
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
            w = weight.to(compute_dtype)
            logits = h @ w.T
            lse, target = row_stats(logits, labels)
            keep = labels != ignore_index
            cross_entropy = torch.where(keep, lse - target, 0.0).sum()
            z_loss = torch.where(keep, lse.square(), 0.0).sum()
        ctx.save_for_backward(logits, lse, labels, h, w)
        ctx.set_materialize_grads(False)
        ctx.hidden_shape, ctx.hidden_dtype, ctx.weight_dtype = hidden.shape, hidden.dtype, weight.dtype
        ctx.ignore_index, ctx.impl = ignore_index, impl
        ctx.logits_consumed = False
        return cross_entropy, z_loss

    @staticmethod
    def backward(ctx, grad_cross_entropy, grad_z_loss):
        if ctx.logits_consumed:
            raise RuntimeError(
                "fused_lm_loss_sums' backward overwrites its saved logits with their gradient, so it runs once "
                "per forward; recompute the loss instead of backpropagating through it again (retain_graph=True)"
            )
        ctx.logits_consumed = True
        logits, lse, labels, h, w = ctx.saved_tensors
        _, gradient_ = _row_passes(ctx.impl)
        zero = lse.new_zeros(())
        grad_cross_entropy = zero if grad_cross_entropy is None else grad_cross_entropy
        grad_z_loss = zero if grad_z_loss is None else grad_z_loss
        keep = labels != ctx.ignore_index
        # d(lse - x[label])/dx = softmax - onehot and d(lse^2)/dx = 2 lse softmax, per kept row.
        softmax_scale = torch.where(keep, grad_cross_entropy + 2 * grad_z_loss * lse, 0.0)
        target_scale = torch.where(keep, grad_cross_entropy, 0.0)
        with torch.autocast(logits.device.type, enabled=False):
            gradient_(logits, labels, lse, softmax_scale, target_scale)
            grad_hidden = grad_weight = None
            if ctx.needs_input_grad[0]:
                grad_hidden = (logits @ w).to(ctx.hidden_dtype).reshape(ctx.hidden_shape)
            if ctx.needs_input_grad[1]:
                grad_weight = (logits.T @ h).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _choose_impl(impl: str, hidden: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"fused_lm_loss_sums: impl must be one of {IMPLS}; got {impl!r}")
    triton_runs_here = TRITON_AVAILABLE and (hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if impl == "auto":  # the interpreter only when asked for by name: it is slow
        return "triton" if TRITON_AVAILABLE and hidden.is_cuda else "torch"
    if impl == "triton" and not triton_runs_here:
        raise ValueError(
            f"fused_lm_loss_sums: impl='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU); got "
            f"a tensor on {hidden.device} with Triton {'installed' if TRITON_AVAILABLE else 'not installed'}; "
            "use impl='torch' or 'auto'"
        )
    return impl


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            "fused_lm_loss_sums expects hidden [..., d] and weight [V, d] with the same d; got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"fused_lm_loss_sums expects labels of hidden's leading shape {tuple(hidden.shape[:-1])}; got labels "
            f"{tuple(labels.shape)}"
        )
    if not (hidden.is_floating_point() and weight.is_floating_point()) or labels.dtype != torch.int64:
        raise ValueError(
            "fused_lm_loss_sums expects floating-point hidden and weight and int64 labels; got hidden "
            f"{hidden.dtype}, weight {weight.dtype}, labels {labels.dtype} (convert labels with .long())"
        )
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(
            f"fused_lm_loss_sums expects hidden, weight and labels on one device; got {hidden.device}, "
            f"{weight.device}, {labels.device}"
        )


def _check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    if labels.device.type != "cpu" and os.environ.get("HYBRIDLM_CHECK_LABELS") != "1":
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bad.any():
        raise ValueError(
            f"fused_lm_loss_sums: labels must lie in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"got {int(bad.sum())} that do not, the first being {int(labels[bad][0])}"
        )


def fused_lm_loss_sums(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of cross-entropy and z-loss of the LM head `logits = hidden @ weight.T`, fused.

    hidden: [..., d] (the final normed hidden states); weight: [V, d] (the LM head, no bias); labels:
    [...] int64, hidden's leading shape, ignore_index on rows that have no target.
    Returns (cross_entropy_sum, z_loss_sum), float32 scalars: sums over the kept rows of
    lse - logits[label] and lse^2, with lse = logsumexp(logits). Both are differentiable w.r.t.
    hidden and weight; the gradients come back in their dtypes (ignored rows give zero).

    The logits are computed in the compute dtype: the autocast dtype when autocast is on for
    hidden's device (as `nn.Linear` under autocast would), else hidden's dtype. impl: "triton"
    (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (PyTorch over row chunks), or "auto" (Triton
    for CUDA tensors, else PyTorch; never the slow interpreter). The backward overwrites the saved logits, so it can run once per forward.
    """
    _check_inputs(hidden, weight, labels)
    impl = _choose_impl(impl, hidden)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = hidden.dtype
    flat_labels = labels.reshape(-1)
    _check_labels(flat_labels, weight.shape[0], ignore_index)
    return _apply_outside_compile()(hidden, weight, flat_labels, ignore_index, compute_dtype, impl)


@functools.cache
def _apply_outside_compile():
    """`_FusedLMLoss.apply` under torch.compiler.disable (torch.compile of a surrounding model does
    not trace into the Triton launches). Built on first use: torch.compiler.disable imports
    torch._dynamo and with it Triton, and importing hybridlm must not import Triton before a caller
    sets TRITON_INTERPRET (Triton's kernels compile or interpret by that variable at definition)."""
    return torch.compiler.disable(_FusedLMLoss.apply)
