"""Generation speed and memory: prefill tokens/s, decode tokens/s and cache/peak memory on a GPU.

For each model (random weights, bf16) and each (batch, context) cell: a `Generator` with a static
cache of context + new_tokens positions prefills `batch` random prompts of `context` tokens and
decodes `new_tokens` tokens (greedy, no stop token) with the CUDA-graph decode step. The graph
capture and a warm-up prefill of one chunk run before the clock starts.

- prefill tok/s: batch * context / prefill seconds (first token sampled included)
- decode tok/s: batch * decode steps / decode seconds
- end-to-end tok/s: generated tokens / (prefill + decode) seconds (what the transformers anchor measures)
- cache: bytes the cache holds (`HybridCache.nbytes()`); extra: CUDA peak allocated during the call
  minus what was allocated before the cache (cache + activations + graph pool + the fused step's
  derived weights)

Decoding uses the fused step (`decode_step(fused=True)`: stacked projections, fused RMSNorm,
in-place Triton GDN state updates). First, at the anchor setting (batch 8, 4096-token prompts) of
every preset, the reference decode step (`fused=False`, the blocks' own forward, no derived weights)
and the fused one are compared: times, GPU kernels per decode step (profiled, one eager step) and
whether the greedy tokens agree (`--no-compare` skips this).

`--check` first verifies the GPU path: CUDA-graph decode == eager decode (tokens and logits), the
static decode step == a full forward, and the fused step == the reference step (float32 and bf16).
`--transformers` also times transformers' `generate` on the same configurations (batch 8,
4096-token prompts), before the largest cells.

    python benchmarks/decode.py --check --transformers --out results.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback

import torch

from hybridlm.generate import Generator
from hybridlm.models import HybridLM, get_preset
from hybridlm.models.memory import decoding_memory

GiB = 2**30


def build_model(preset: str, max_length: int, dtype: torch.dtype, device: str) -> HybridLM:
    config = get_preset(preset, max_seq_len=max_length)
    with torch.device(device):
        model = HybridLM(config)
    return model.to(dtype).eval()


def allocated_bytes(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


# Correctness on the device --------------------------------------------------------------------
@torch.no_grad()
def check_gpu_path(device: str, new_tokens: int = 40) -> list[dict]:
    """On a left-padded batch whose prompts are longer and shorter than the sliding window:
    - eager static decode steps vs one full forward of each prompt + continuation alone;
    - the decode step replayed from a CUDA graph vs the same step run eagerly (should be identical);
    - `Generator` tokens with and without the CUDA graph."""
    results = []
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        for preset in ("hybrid-mini", "olmo3-mini"):
            config = get_preset(preset, max_seq_len=512, sliding_window=48)
            torch.manual_seed(0)
            with torch.device(device):
                model = HybridLM(config)
                for name, param in model.named_parameters():  # sharper, non-trivial logits
                    if "norm" in name:
                        param.add_(0.1 * torch.randn_like(param))
                    elif name.endswith("weight") and "embed" not in name:
                        param.mul_(3.0)
            model = model.to(dtype).eval()
            lengths = [100, 37, 64, 1]
            width = max(lengths)
            prompts = [torch.randint(2, config.vocab_size, (n,), device=device) for n in lengths]
            ids = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            for row, prompt in enumerate(prompts):
                ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, True
            continuation = torch.randint(2, config.vocab_size, (len(lengths), new_tokens), device=device)

            eager_cache = model.allocate_cache(len(lengths), width + new_tokens)
            model(ids, attention_mask=mask, cache=eager_cache)
            eager = torch.stack([model.decode_step(continuation[:, t : t + 1], eager_cache) for t in range(new_tokens)], 1)
            reference_cache = model.allocate_cache(len(lengths), width + new_tokens)
            model(ids, attention_mask=mask, cache=reference_cache)
            reference = torch.stack(
                [model.decode_step(continuation[:, t : t + 1], reference_cache, fused=False) for t in range(new_tokens)],
                1,
            )
            fused_gap = float((eager.float() - reference.float()).abs().max() / reference.float().abs().max())

            graph_cache = model.allocate_cache(len(lengths), width + new_tokens)
            step_ids = continuation[:, :1].clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model.decode_step(step_ids, graph_cache)
            torch.cuda.current_stream().wait_stream(stream)
            graph_cache.reset()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step_logits = model.decode_step(step_ids, graph_cache)
            graph_cache.reset()
            model(ids, attention_mask=mask, cache=graph_cache)
            replayed = []
            for t in range(new_tokens):
                step_ids.copy_(continuation[:, t : t + 1])
                graph.replay()
                replayed.append(step_logits.clone())
            replayed = torch.stack(replayed, 1)

            worst = 0.0
            for row, prompt in enumerate(prompts):
                full = model(torch.cat([prompt, continuation[row]])[None]).logits[0, len(prompt) :].float()
                worst = max(worst, float((eager[row].float() - full).abs().max() / full.abs().max()))
            token_prompts = [p.tolist() for p in prompts]
            tokens = {
                use_graph: Generator(model, len(lengths), width + new_tokens, use_cuda_graph=use_graph)
                .generate(token_prompts, max_new_tokens=new_tokens, stop_token_ids=())
                for use_graph in (True, False)
            }
            graph_gap = float((replayed - eager).abs().max())
            row = {
                "check": "gpu-path",
                "preset": preset,
                "dtype": str(dtype).removeprefix("torch."),
                "static_decode_vs_full_forward_rel_err": worst,
                "fused_vs_reference_step_rel_err": fused_gap,
                "tolerance": tolerance,
                "graph_vs_eager_max_abs_diff": graph_gap,
                "graph_equals_eager_tokens": tokens[True] == tokens[False],
            }
            row["ok"] = (
                worst <= tolerance and fused_gap <= tolerance and graph_gap == 0.0 and row["graph_equals_eager_tokens"]
            )
            print(json.dumps(row), flush=True)
            results.append(row)
            del model, eager_cache, reference_cache, graph_cache, graph
    return results


def kernels_per_step(model: HybridLM, engine: Generator, fused: bool) -> int | None:
    """GPU kernels (and memory operations) of one eager decode step, from the CUDA profiler."""
    from torch.profiler import ProfilerActivity, profile

    try:
        engine.cache.reset()
        with profile(activities=[ProfilerActivity.CUDA]) as profiler:
            model.decode_step(engine._step_ids, engine.cache, fused=fused)
            torch.cuda.synchronize()
        return sum(1 for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as error:  # the count is informative; a profiler problem must not stop the run
        print(f"kernel count failed: {error!r}"[:300], file=sys.stderr)
        return None


# The grid ---------------------------------------------------------------------------------------
@torch.no_grad()
def run_cell(
    model: HybridLM,
    preset: str,
    batch: int,
    context: int,
    new_tokens: int,
    device: str,
    use_cuda_graph: bool = True,
    fused: bool = True,
    keep_tokens: bool = False,
) -> dict:
    # Start without derived weights: the reference path then prefills unfused too, and the fused
    # path's extra memory includes its derived weights (built by the Generator).
    model.release_inference_weights()
    baseline = allocated_bytes(device)
    use_cuda_graph = use_cuda_graph and device == "cuda"
    engine = Generator(model, batch, context + new_tokens, use_cuda_graph=use_cuda_graph, fused=fused)
    generator = torch.Generator(device).manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, context), device=device, generator=generator)
    chunk = max(1, engine.prefill_chunk_tokens // batch)
    warm = time.perf_counter()
    engine.generate(prompts[:, : min(context, chunk)], max_new_tokens=2, stop_token_ids=())  # capture + warm-up
    warm = time.perf_counter() - warm
    output = engine.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=(), return_stats=True)
    stats = output.stats
    formula = decoding_memory(model.config, context + new_tokens, batch_size=batch, dtype=next(model.parameters()).dtype)
    row = {
        "preset": preset,
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "prefill_s": stats.prefill_seconds,
        "decode_s": stats.decode_seconds,
        "decode_steps": stats.decode_steps,
        "prefill_tok_s": batch * context / stats.prefill_seconds,
        "decode_tok_s": batch * stats.decode_steps / stats.decode_seconds,
        "step_ms": 1000 * stats.decode_seconds / max(stats.decode_steps, 1),
        "end_to_end_tok_s": stats.tokens_per_second,
        "cache_bytes": stats.cache_bytes["total"],
        "cache_formula_bytes": formula.total_bytes,
        "extra_peak_bytes": (stats.peak_memory_bytes or 0) - baseline,
        "capture_and_warmup_s": warm,
        "cuda_graph": stats.cuda_graph,
        "fused": fused,
    }
    if keep_tokens:
        row["tokens"] = output.sequences
        if device == "cuda":
            row["kernels_per_step"] = kernels_per_step(model, engine, fused)
    del engine, output
    return row


def compare_paths(
    model: HybridLM, preset: str, new_tokens: int, device: str, batch: int = 8, context: int = 4096
) -> list[dict]:
    """The reference decode step vs the fused one at one cell: times, kernels per step, token agreement."""
    rows = {}
    for fused in (False, True):
        rows[fused] = run_cell(model, preset, batch, context, new_tokens, device, fused=fused, keep_tokens=True)
    reference_tokens, fused_tokens = rows[False].pop("tokens"), rows[True].pop("tokens")
    same = sum(a == b for ref, new in zip(reference_tokens, fused_tokens) for a, b in zip(ref, new))
    total = sum(len(ref) for ref in reference_tokens)
    for fused, row in rows.items():
        row["compare"] = "fused" if fused else "reference"
        row["tokens_equal_to_reference"] = f"{same}/{total}"
    return [rows[False], rows[True]]


@torch.no_grad()
def run_transformers(preset: str, batch: int, context: int, new_tokens: int, device: str) -> dict:
    """transformers' generate (greedy, exactly new_tokens tokens) on the same configuration, random
    weights, bf16, its default cache; one measured call (our runs before it warmed the GPU)."""
    import transformers

    from hybridlm.interop.hf import config_to_hf

    config = get_preset(preset, max_seq_len=context + new_tokens)
    fields = config_to_hf(config, torch.bfloat16)
    cls_config, cls_model = (
        (transformers.OlmoHybridConfig, transformers.OlmoHybridForCausalLM)
        if fields["model_type"] == "olmo_hybrid"
        else (transformers.Olmo3Config, transformers.Olmo3ForCausalLM)
    )
    fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type", "dtype")}
    with torch.device(device):
        model = cls_model(cls_config(**fields)).to(torch.bfloat16).eval()
    prompts = torch.randint(0, config.vocab_size, (batch, context), device=device)
    mask = torch.ones_like(prompts)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=config.pad_token_id)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - context) * batch
    row = {
        "preset": preset,
        "impl": f"transformers {transformers.__version__}",
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "seconds": seconds,
        "end_to_end_tok_s": generated / seconds,
        "extra_peak_bytes": torch.cuda.max_memory_allocated() - baseline,
    }
    del model, out
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["hybrid-1b", "olmo3-1b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768, 65536])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--check", action="store_true", help="verify the GPU decode path first")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the reference-vs-fused decode step comparison at batch 8, 4096-token prompts")
    parser.add_argument("--transformers", action="store_true", help="also time transformers' generate (batch 8, 4K)")
    parser.add_argument("--budget-seconds", type=float, default=1e9,
                        help="skip the remaining (largest) cells once this much time has passed")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU (use --device cpu only to smoke-test this script on tiny presets)", file=sys.stderr)
        return 2
    began = time.perf_counter()
    sink = open(args.out, "a") if args.out else None

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if sink:
            sink.write(json.dumps(row) + "\n")
            sink.flush()

    record({
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    })
    if args.check:
        try:
            for row in check_gpu_path(device):
                if sink:
                    sink.write(json.dumps(row) + "\n")
        except Exception as error:  # report, then still measure
            traceback.print_exc()
            record({"check": "gpu-path", "error": repr(error)[:500]})
    max_length = max(args.contexts) + args.new_tokens
    models = {preset: build_model(preset, max_length, torch.bfloat16, device) for preset in args.presets}
    compare_rows = []
    if not args.no_compare:
        for preset in args.presets:
            context = min(4096, max(args.contexts))
            try:
                for row in compare_paths(models[preset], preset, args.new_tokens, device, context=context):
                    record(row)
                    compare_rows.append(row)
            except Exception as error:  # report, then still measure the grid
                traceback.print_exc()
                record({"preset": preset, "compare": "error", "error": repr(error)[:500]})
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    cells = sorted(
        ((batch * context, batch, context, preset) for preset in args.presets for batch in args.batches for context in args.contexts),
        key=lambda cell: (cell[0], cell[1], args.presets.index(cell[3])),
    )
    rows, hf_rows = [], []

    def time_transformers() -> None:
        """transformers' generate at the anchor setting (batch 8, 4096-token prompts)."""
        for preset in args.presets:
            try:
                row = run_transformers(preset, 8, 4096, args.new_tokens, device)
            except Exception as error:  # a missing model class or kernel must not lose the other results
                row = {"preset": preset, "impl": "transformers", "error": repr(error)[:300]}
            record(row)
            hf_rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()

    for tokens, batch, context, preset in cells:
        if args.transformers and not hf_rows and tokens > 8 * 4096:  # before the largest cells
            time_transformers()
        if time.perf_counter() - began > args.budget_seconds:
            record({"preset": preset, "batch": batch, "context": context, "skipped": "time budget"})
            continue
        try:
            row = run_cell(models[preset], preset, batch, context, args.new_tokens, device)
        except torch.OutOfMemoryError as error:
            row = {"preset": preset, "batch": batch, "context": context, "error": repr(error)[:300]}
        except Exception as error:  # e.g. a capture failure: measure eagerly, and say why
            traceback.print_exc()
            try:
                row = run_cell(models[preset], preset, batch, context, args.new_tokens, device, use_cuda_graph=False)
                row["graph_error"] = repr(error)[:300]
            except Exception as second:
                row = {"preset": preset, "batch": batch, "context": context, "error": repr(second)[:300]}
        record(row)
        rows.append(row)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.transformers and not hf_rows:
        time_transformers()

    print()
    print(f"{'preset':<10} {'batch':>5} {'context':>7} {'prefill tok/s':>13} {'decode tok/s':>12} {'step ms':>8} "
          f"{'e2e tok/s':>9} {'cache GiB':>9} {'extra GiB':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['preset']:<10} {row['batch']:>5} {row['context']:>7} {row['error'][:60]}")
            continue
        print(f"{row['preset']:<10} {row['batch']:>5} {row['context']:>7} {row['prefill_tok_s']:>13,.0f} "
              f"{row['decode_tok_s']:>12,.0f} {row['step_ms']:>8.2f} {row['end_to_end_tok_s']:>9,.0f} "
              f"{row['cache_bytes'] / GiB:>9.2f} {row['extra_peak_bytes'] / GiB:>9.2f}")
    if compare_rows:
        print()
        print(f"{'preset':<10} {'decode step':<11} {'prefill s':>9} {'decode s':>8} {'step ms':>8} {'e2e tok/s':>9} "
              f"{'kernels/step':>12} {'tokens = ref':>12}")
        for row in compare_rows:
            kernels = row.get("kernels_per_step")
            print(f"{row['preset']:<10} {row['compare']:<11} {row['prefill_s']:>9.3f} {row['decode_s']:>8.3f} "
                  f"{row['step_ms']:>8.2f} {row['end_to_end_tok_s']:>9,.0f} {kernels if kernels is not None else '-':>12} "
                  f"{row['tokens_equal_to_reference']:>12}")
    for row in hf_rows:
        if "error" in row:
            print(f"{row['preset']:<10} transformers: {row['error'][:100]}")
        else:
            print(f"{row['preset']:<10} {row['impl']}: batch 8, 4096 + {row['new_tokens']}: "
                  f"{row['end_to_end_tok_s']:,.1f} tok/s, extra {row['extra_peak_bytes'] / GiB:.2f} GiB")
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


def _version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
