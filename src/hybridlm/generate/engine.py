"""The generation engine: prefill a left-padded batch, then decode one token per step.

Prefill runs `HybridLM.forward` with the cache (the chunked GDN operator, any prompt length, in
chunks of at most `prefill_chunk_tokens` tokens so activations stay bounded). Decoding runs the
static-shape `HybridLM.decode_step` (the recurrent GDN step, attention over the preallocated KV
buffers), by default its fused path (stacked projections and in-place Triton state updates, with
the derived weights of `HybridLM.prepare_for_inference`, refreshed at every call); on a GPU that
step is captured once in a CUDA graph and replayed, so a step costs one graph launch instead of
hundreds of kernel launches from Python.

`generate(model, input_ids, ...)` does one call; a `Generator` keeps its cache and captured graph
for repeated calls with the same batch size and length budget (serving, benchmarks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from hybridlm.generate.sampling import SamplingConfig, sample_next_token

DEFAULT_PREFILL_CHUNK_TOKENS = 32768
STOP_CHECK_INTERVAL = 8  # decode steps between host reads of "has every sequence stopped?"


@dataclass
class GenerationStats:
    """What one `generate` call did and cost. Times are wall-clock seconds (the device is synchronised
    before each clock read); memory is in bytes."""

    batch_size: int
    prompt_length: int  # the padded prompt width
    prompt_tokens: int  # real (non-padding) prompt tokens over the batch
    generated_tokens: int  # tokens returned over the batch (stop tokens included)
    decode_steps: int
    prefill_seconds: float
    decode_seconds: float
    cache_bytes: dict[str, int]  # the cache actually allocated: {"recurrent", "kv", "total"}
    cuda_graph: bool
    peak_memory_bytes: int | None = None  # CUDA peak allocated during the call (None on CPU)

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens over the whole call, prefill included."""
        return self.generated_tokens / self.total_seconds if self.total_seconds > 0 else float("inf")

    def summary(self) -> str:
        cache = self.cache_bytes
        return (
            f"batch {self.batch_size}, prompt {self.prompt_tokens} tokens (width {self.prompt_length}), "
            f"{self.generated_tokens} generated; prefill {self.prefill_seconds:.3f} s, "
            f"decode {self.decode_seconds:.3f} s ({self.decode_steps} steps, "
            f"{'CUDA graph' if self.cuda_graph else 'eager'}); {self.tokens_per_second:.1f} tokens/s; "
            f"cache {cache['total'] / 2**20:.2f} MiB (recurrent {cache['recurrent'] / 2**20:.2f} MiB, "
            f"KV {cache['kv'] / 2**20:.2f} MiB)"
            + (f"; peak memory {self.peak_memory_bytes / 2**30:.2f} GiB" if self.peak_memory_bytes else "")
        )


@dataclass
class GenerationOutput:
    """sequences: the generated ids of every prompt (prompt excluded), each ending at its first stop
    token (included) or after max_new_tokens. stats: see `GenerationStats`."""

    sequences: list[list[int]]
    stats: GenerationStats = field(repr=False)


def prepare_prompts(
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None,
    *,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate prompts and return (ids [B, T] int64, mask [B, T] bool), left-padded.

    input_ids: a [B, T] or [T] integer tensor (with an optional [B, T] attention_mask, 1 = real token,
    0 = padding on the left), or a list of token-id lists of any lengths (padded here). Padding
    positions get id 0, so their stored value never matters.
    """
    if not isinstance(input_ids, torch.Tensor):
        if attention_mask is not None:
            raise ValueError("attention_mask is only for tensor input_ids; lists of prompts are padded here")
        prompts = [list(p) for p in input_ids]
        if not prompts:
            raise ValueError("no prompts given: input_ids is an empty list")
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), max(width, 1), dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            if prompt:
                ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
                mask[row, width - len(prompt) :] = True
    else:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor [B, T] or [T]; got {input_ids.dtype} {tuple(input_ids.shape)}")
        ids = input_ids.long()
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            if attention_mask.shape != ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {tuple(ids.shape)}; got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(device=ids.device).bool()
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(ids.shape)}; every prompt needs at least one token")
    empty_rows = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(f"empty prompt in rows {empty_rows}: every prompt needs at least one real token")
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError(
            "attention_mask must use left padding (zeros, then ones, in every row); pad prompts on the left"
        )
    ids = ids.masked_fill(~mask, 0)
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        values = sorted(set(ids[bad].tolist()))[:10]
        raise ValueError(f"token ids must lie in [0, {vocab_size}) (the model's vocab_size); got {values}")
    return ids, mask


class Generator:
    """Generation with one preallocated cache for up to `batch_size` prompts and `max_length`
    positions (prompt width + max_new_tokens), reusable across calls.

    use_cuda_graph: capture the decode step in a CUDA graph (default: when the model is on a GPU).
        The graph is captured on the first call and replayed afterwards.
    prefill_chunk_tokens: at most this many tokens (batch x chunk length) per prefill forward.
    gdn_impl: the `gated_delta_rule` implementation for GDN layers ("auto" picks the fastest).
    fused: decode with `decode_step(fused=True)` (default); False runs the reference blocks (for
        comparisons; same tokens up to float rounding, slower).
    """

    def __init__(
        self,
        model,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype | None = None,
        use_cuda_graph: bool | None = None,
        prefill_chunk_tokens: int | None = DEFAULT_PREFILL_CHUNK_TOKENS,
        gdn_impl: str = "auto",
        fused: bool = True,
    ):
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1; got {batch_size} and {max_length}")
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be None or >= 1; got {prefill_chunk_tokens}")
        self.model = model
        self.batch_size = batch_size
        self.max_length = max_length
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.gdn_impl = gdn_impl
        self.fused = fused
        self.cache = model.allocate_cache(batch_size, max_length, dtype=dtype)
        self.device = self.cache.key_padding.device
        if use_cuda_graph is None:
            use_cuda_graph = self.device.type == "cuda"
        if use_cuda_graph and self.device.type != "cuda":
            raise ValueError(f"use_cuda_graph needs the model on a CUDA device; it is on {self.device}")
        self.use_cuda_graph = use_cuda_graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._step_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._step_logits: torch.Tensor | None = None

    # Decoding -------------------------------------------------------------------------------
    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] and return the next logits [B, vocab] (a buffer reused by the next call)."""
        self._step_ids.copy_(tokens[:, None])
        if self._graph is None:
            return self._decode_step()
        self._graph.replay()
        return self._step_logits

    def _decode_step(self) -> torch.Tensor:
        return self.model.decode_step(self._step_ids, self.cache, gdn_impl=self.gdn_impl, fused=self.fused)

    @torch.no_grad()
    def _capture(self) -> None:
        """Capture the decode step. Warm-up steps run eagerly first (kernel autotuning, library
        handles) on a side stream; they and the capture write into the cache, so it is reset after."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.cache.reset()
                self._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.cache.reset()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step_logits = self._decode_step()
        self._graph = graph
        self.cache.reset()

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the prompts through the model into the cache; return the last position's logits [B, vocab]."""
        batch, width = ids.shape
        chunk = width if self.prefill_chunk_tokens is None else max(1, self.prefill_chunk_tokens // batch)
        padded = not bool(mask.all())
        logits = None
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            output = self.model(
                ids[:, start:end],
                attention_mask=mask[:, start:end] if padded else None,
                cache=self.cache,
                logits_to_keep=1,
                compute_logits=end == width,
                gdn_impl=self.gdn_impl,
            )
            logits = output.logits
        return logits[:, -1]

    # The public call ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] | int | None = None,
        seed: int | None = None,
        streamer: Callable[[list[int | None]], None] | None = None,
        return_stats: bool = False,
    ) -> list[list[int]] | GenerationOutput:
        """Generate up to `max_new_tokens` tokens for each prompt; see `generate` for the arguments."""
        model = self.model
        config = model.config
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        ids, mask = prepare_prompts(input_ids, attention_mask, vocab_size=config.vocab_size)
        n_prompts, width = ids.shape
        if width > config.max_seq_len:
            raise ValueError(
                f"the prompt is {width} tokens long but the model supports at most max_seq_len={config.max_seq_len}"
            )
        if width + max_new_tokens > config.max_seq_len:
            raise ValueError(
                f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's max_seq_len "
                f"{config.max_seq_len}; lower max_new_tokens to at most {config.max_seq_len - width}"
            )
        if n_prompts > self.batch_size:
            raise ValueError(f"{n_prompts} prompts given but this Generator holds at most {self.batch_size}")
        if width + max_new_tokens > self.max_length:
            raise ValueError(
                f"prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) exceeds this Generator's "
                f"max_length {self.max_length}; create it with a larger max_length"
            )
        stops = _stop_tokens(stop_token_ids, config)
        bad_stops = [t for t in stops if not 0 <= t < config.vocab_size]
        if bad_stops:
            raise ValueError(f"stop_token_ids must lie in [0, {config.vocab_size}); got {bad_stops}")
        if max_new_tokens == 0:
            empty = [[] for _ in range(n_prompts)]
            return GenerationOutput(empty, self._stats(mask, 0, 0, 0.0, 0.0, None)) if return_stats else empty

        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        if n_prompts < self.batch_size:  # filler rows: one real token each, dropped at the end
            filler = self.batch_size - n_prompts
            ids = torch.cat([ids, ids.new_zeros(filler, width)])
            mask = torch.cat([mask, mask.new_zeros(filler, width)])
            mask[n_prompts:, -1] = True
        fill_token = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        stop_tensor = torch.tensor(stops, dtype=torch.long, device=device)

        # The fused step's derived weights follow the parameters as they are now (refilled in place,
        # so a captured graph stays valid unless they had to be reallocated).
        if self.fused and model.prepare_for_inference():
            self._graph = None
        if self.use_cuda_graph and self._graph is None:
            self._capture()
        measure = return_stats
        if measure and device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        self.cache.reset()
        next_tokens = sample_next_token(self._prefill(ids, mask), sampling, generator)
        if measure:
            _synchronize(device)
        prefill_done = time.perf_counter()

        out = torch.full((self.batch_size, max_new_tokens), fill_token, dtype=torch.long, device=device)
        finished = torch.zeros(self.batch_size, dtype=torch.bool, device=device)
        finished[n_prompts:] = True
        steps = 1
        for step in range(max_new_tokens):
            if step > 0:
                next_tokens = sample_next_token(self._decode(next_tokens), sampling, generator)
                steps += 1
            next_tokens = torch.where(finished, fill_token, next_tokens)
            out[:, step] = next_tokens
            if streamer is not None:
                host = next_tokens[:n_prompts].tolist()
                done = finished[:n_prompts].tolist()
                streamer([None if d else t for t, d in zip(host, done)])
            if len(stops):
                finished |= torch.isin(next_tokens, stop_tensor)
                if (step + 1) % STOP_CHECK_INTERVAL == 0 and bool(finished.all()):
                    break
        out = out[:n_prompts, :steps].cpu()
        if measure:
            _synchronize(device)
        decode_done = time.perf_counter()

        sequences = []
        for row in out.tolist():
            for index, token in enumerate(row):
                if token in stops:
                    row = row[: index + 1]
                    break
            sequences.append(row)
        if not return_stats:
            return sequences
        generated = sum(len(s) for s in sequences)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        stats = self._stats(mask[:n_prompts], generated, steps - 1, prefill_done - started, decode_done - prefill_done, peak)
        return GenerationOutput(sequences, stats)

    def _stats(self, mask, generated, decode_steps, prefill_seconds, decode_seconds, peak) -> GenerationStats:
        return GenerationStats(
            batch_size=mask.shape[0],
            prompt_length=mask.shape[1],
            prompt_tokens=int(mask.sum()),
            generated_tokens=generated,
            decode_steps=decode_steps,
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            cache_bytes=self.cache.nbytes(),
            cuda_graph=self._graph is not None,
            peak_memory_bytes=peak,
        )


def generate(
    model,
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] | int | None = None,
    seed: int | None = None,
    streamer: Callable[[list[int | None]], None] | None = None,
    return_stats: bool = False,
    use_cuda_graph: bool | None = None,
    prefill_chunk_tokens: int | None = DEFAULT_PREFILL_CHUNK_TOKENS,
    gdn_impl: str = "auto",
    fused: bool = True,
) -> list[list[int]] | GenerationOutput:
    """Generate continuations of prompts with a `HybridLM`.

    input_ids: [B, T] int tensor with attention_mask [B, T] (1 = token, 0 = left padding), a [T]
        tensor, or a list of token-id lists of different lengths (left-padded here).
    max_new_tokens: at most this many new tokens per prompt (>= 0).
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature), optionally
        restricted to the top_k tokens and/or the top_p probability mass.
    stop_token_ids: a sequence stops after emitting one of these (kept in its output). None: the
        model's eos_token_id; () or []: never stop early.
    seed: seeds a torch.Generator for reproducible sampling (None: the global RNG).
    streamer: called after every step with the new token of each prompt (None for finished ones).
    return_stats: return a `GenerationOutput` (sequences + timing, cache bytes, peak memory) instead
        of the sequences alone.
    use_cuda_graph, prefill_chunk_tokens, gdn_impl, fused: see `Generator`.

    Returns the generated ids of every prompt (the prompt itself excluded) as a list of lists, each
    ending at its first stop token (included) or after max_new_tokens.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0; got {max_new_tokens!r}")
    if isinstance(input_ids, torch.Tensor):
        batch = 1 if input_ids.dim() == 1 else input_ids.shape[0]
        width = input_ids.shape[-1]
    else:
        batch = len(input_ids)
        width = max((len(p) for p in input_ids), default=0)
    # Bad prompts are reported by Generator.generate; here the cache only needs a valid size.
    max_length = max(1, min(width + max_new_tokens, model.config.max_seq_len))
    engine = Generator(
        model,
        max(batch, 1),
        max_length,
        use_cuda_graph=use_cuda_graph,
        prefill_chunk_tokens=prefill_chunk_tokens,
        gdn_impl=gdn_impl,
        fused=fused,
    )
    return engine.generate(
        input_ids,
        attention_mask,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=stop_token_ids,
        seed=seed,
        streamer=streamer,
        return_stats=return_stats,
    )


def _stop_tokens(stop_token_ids: Sequence[int] | int | None, config) -> list[int]:
    if stop_token_ids is None:
        return [] if config.eos_token_id is None else [config.eos_token_id]
    if isinstance(stop_token_ids, int):
        return [stop_token_ids]
    return [int(t) for t in stop_token_ids]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
