"""Training throughput (tokens/s, MFU, peak memory) of hybridlm presets and of transformers' models.

    python benchmarks/train_throughput.py [--presets hybrid-1b olmo3-1b transformer-1b]
        [--seq-lens 4096 8192] [--tokens-per-step 16384] [--steps 8] [--warmup 3]
        [--compile] [--activation-checkpointing] [--transformers] [--device cuda|cpu] [--grad-accum N]

One process, one device, a plain loop: random tokens, bf16 autocast over float32 parameters,
cross-entropy on all positions (for our models through the model's fused LM-head loss, as the
trainer does; `--loss logits` for float32 cross-entropy over materialised logits, which transformers'
models always use), fused AdamW (foreach on CPU); float32 on CPU by default. Per step, time from the first forward
to the end of the optimizer step (the device synchronised before reading the clock), median over
the timed steps after `--warmup` untimed ones. With --grad-accum N a step is N forward/backward passes
of --tokens-per-step tokens each (different tokens) and one optimizer step, as in training at a
global batch larger than one pass: the optimizer's fixed cost per step (about 28 ms for a 1B model
on an H200) is shared by N times the tokens.

MFU = 6 N tokens/s / peak, N the non-embedding parameters (the LM head counts), peak 989 TFLOP/s
(dense bf16, H100/H200 SXM); attention's own FLOPs are not counted (the usual 6N convention).
With --transformers, transformers' OlmoHybridForCausalLM / Olmo3ForCausalLM at the same config run
in the same process (through hybridlm.interop.hf.config_to_hf), with whatever GDN kernels that
transformers finds (its PyTorch fallback when fla is not installed).
On CPU use a small preset (e.g. --presets hybrid-tiny --seq-lens 256 --tokens-per-step 512).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from hybridlm.models import HybridLM, get_preset

PEAK_FLOPS = 989e12


def build_ours(preset: str, seq_len: int, device: torch.device, checkpointing: bool, compile_blocks: bool,
               gdn_impl: str = "auto", attn_impl: str = "auto", loss: str = "fused"):
    config = get_preset(preset, max_seq_len=max(seq_len, get_preset(preset).max_seq_len))
    with device:  # initialise on the device: a 1B model's init on the host takes seconds
        model = HybridLM(config)
    n_params = model.num_parameters(exclude_embeddings=True)
    for block in model.model.layers:
        if checkpointing:
            _checkpoint(block)
        if compile_blocks:
            block.compile()

    def loss_fn(input_ids, labels):
        if loss == "fused":  # what the trainer does: the model's fused LM-head loss
            output = model(input_ids, labels=labels, gdn_impl=gdn_impl, attn_impl=attn_impl)
            return output.cross_entropy_sum / labels.numel()
        logits = model(input_ids, gdn_impl=gdn_impl, attn_impl=attn_impl).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    return model, loss_fn, n_params, config.vocab_size


def build_transformers(preset: str, seq_len: int, device: torch.device, checkpointing: bool):
    import transformers

    from hybridlm.interop.hf import config_to_hf, transformers_incompatibilities

    config = get_preset(preset, max_seq_len=max(seq_len, get_preset(preset).max_seq_len))
    problems = transformers_incompatibilities(config)
    if problems:
        raise ValueError(f"transformers cannot build {preset}: {'; '.join(problems)}")
    hf = config_to_hf(config, torch.float32)
    if hf["model_type"] == "olmo_hybrid":
        hf_config, cls = transformers.OlmoHybridConfig(**hf), transformers.OlmoHybridForCausalLM
    else:
        hf_config, cls = transformers.Olmo3Config(**hf), transformers.Olmo3ForCausalLM
    hf_config._attn_implementation = "sdpa"
    with device:
        model = cls(hf_config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    embed = model.get_input_embeddings().weight.numel()
    n_params = sum(p.numel() for p in model.parameters()) - embed

    def loss_fn(input_ids, labels):
        logits = model(input_ids=input_ids, use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    return model, loss_fn, n_params, config.vocab_size


def _checkpoint(block: torch.nn.Module) -> None:
    """Recompute the block's activations in the backward (keeps isinstance checks on the block)."""
    forward = block.forward

    def checkpointed(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def measure(model, loss_fn, n_params, vocab, *, seq_len, batch, steps, warmup, device, autocast, grad_accum=1) -> dict:
    cuda = device.type == "cuda"
    fused = {"fused": True} if cuda else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, **fused)
    gen = torch.Generator(device=device).manual_seed(0)
    micro_batches = []
    for _ in range(grad_accum):
        input_ids = torch.randint(0, vocab, (batch, seq_len + 1), device=device, generator=gen)
        micro_batches.append((input_ids[:, :-1].contiguous(), input_ids[:, 1:].contiguous()))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for inputs, labels in micro_batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(inputs, labels) / grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(loss.item() * grad_accum)
    seconds = statistics.median(times)
    tokens_per_s = grad_accum * batch * seq_len / seconds
    return {
        "step_s": seconds,
        "tokens_per_s": tokens_per_s,
        "mfu": 6 * n_params * tokens_per_s / PEAK_FLOPS,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else float("nan"),
        "n_params": n_params,
        "loss_first_last": (losses[0], losses[-1]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["hybrid-1b", "olmo3-1b", "transformer-1b"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[4096, 8192])
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--loss", choices=["fused", "logits"], default="fused",
                        help="our models' loss: the fused LM-head loss (the trainer's) or cross-entropy over logits")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="forward/backward passes of --tokens-per-step tokens per optimizer step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile every block (ours only)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--transformers", action="store_true", help="also transformers' models at the same configs")
    parser.add_argument("--transformers-seq-lens", nargs="+", type=int, default=None,
                        help="sequence lengths for transformers' models (default: --seq-lens)")
    parser.add_argument("--attn-impl", default="auto", choices=["auto", "flex", "sdpa"],
                        help="how our attention layers apply sliding windows (auto: flex attention on CUDA)")
    parser.add_argument("--gdn-impl", default="auto", help="gated_delta_rule implementation of our models (auto, triton, triton-split, chunk)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="bf16 autocast over float32 parameters (default on CUDA) or plain float32 (default on CPU)")
    parser.add_argument("--split-options", default=None,
                        help='JSON of chunk_split.KernelOptions fields for the "triton-split" GDN kernels, e.g. \'{"f16_state_forward": true}\'')
    args = parser.parse_args()
    if args.split_options:
        import json

        from hybridlm.ops.gated_delta_rule.triton.chunk_split import SPLIT_OPTIONS

        for key, value in json.loads(args.split_options).items():
            if not hasattr(SPLIT_OPTIONS, key):
                parser.error(f"--split-options: no KernelOptions field {key!r}")
            setattr(SPLIT_OPTIONS, key, value)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    rows = []
    runs = [("hybridlm", preset, seq) for seq in args.seq_lens for preset in args.presets]
    if args.transformers:
        for seq in args.transformers_seq_lens or args.seq_lens:
            runs += [("transformers", preset, seq) for preset in args.presets if preset.startswith(("hybrid", "olmo3"))]
    for impl, preset, seq_len in runs:
        batch = max(1, args.tokens_per_step // seq_len)
        ours = impl == "hybridlm"
        label = " ".join([f"{impl} {preset} T={seq_len} B={batch}"]
                         + ([f"gdn={args.gdn_impl}"] if ours and args.gdn_impl != "auto" else [])
                         + ([f"attn={args.attn_impl}"] if ours and args.attn_impl != "auto" else [])
                         + (["compiled"] if ours and args.compile else [])
                         + ([f"accum={args.grad_accum}"] if args.grad_accum > 1 else [])
                         + (["loss=logits"] if ours and args.loss == "logits" else []))
        try:
            if impl == "hybridlm":
                built = build_ours(preset, seq_len, device, args.activation_checkpointing, args.compile, args.gdn_impl,
                                   args.attn_impl, args.loss)
            else:
                built = build_transformers(preset, seq_len, device, args.activation_checkpointing)
            model, loss_fn, n_params, vocab = built
            result = measure(model, loss_fn, n_params, vocab, seq_len=seq_len, batch=batch,
                             steps=args.steps, warmup=args.warmup, device=device, grad_accum=args.grad_accum,
                             autocast=(args.precision or ("bf16" if device.type == "cuda" else "fp32")) == "bf16")
            rows.append((label, result))
            print(f"{label}: {result['tokens_per_s']:.0f} tok/s, MFU {100 * result['mfu']:.1f}%, "
                  f"peak {result['peak_gb']:.1f} GB, loss {result['loss_first_last'][0]:.3f} -> "
                  f"{result['loss_first_last'][1]:.3f}", flush=True)
        except Exception as exc:  # one failing configuration (e.g. out of memory) must not end the run
            traceback.print_exc()
            rows.append((label, {"error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:150]}"}))
            print(f"{label}: {rows[-1][1]['error']}", flush=True)
        model = loss_fn = built = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{time.strftime('%Y-%m-%d')} {name}, torch {torch.__version__}, command: {' '.join(sys.argv)}")
    print("\n| run | params (non-emb) | tokens/s | MFU | peak GB |\n|---|---|---|---|---|")
    for label, r in rows:
        if "error" in r:
            print(f"| {label} | | {r['error']} | | |")
        else:
            print(f"| {label} | {r['n_params'] / 1e9:.2f}B | {r['tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | {r['peak_gb']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
