"""The lm-evaluation-harness model `hybridlm`: any hybridlm checkpoint under lm-eval's tasks.

Importing this module registers the model with lm-eval (it needs the optional `lm_eval` package,
in the dev extras). Then:

    hybridlm eval harness --model_args pretrained=DIR --tasks hellaswag --batch_size 8
    # or, in Python:
    import hybridlm.evaluate.harness
    lm_eval.simple_evaluate(model="hybridlm", model_args="pretrained=DIR", tasks=[...])

lm-eval 0.4.13 finds models only in its own registry (no plugin entry points), so the plain
`lm_eval --model hybridlm ...` command cannot see this module unless something imports it first:
`hybridlm eval harness ARGS` is that command (it imports this module, then runs lm-eval's own CLI
with ARGS, adding `--model hybridlm` when no model is named).

model_args: pretrained (a Hugging Face checkpoint or a training run directory; required), step (a
run's checkpoint step), tokenizer (a tokenizer.json, default: the one beside the weights),
max_length (tokens per forward, default the model's max_seq_len), max_gen_toks (default 256),
dtype (float32 | bfloat16 | float16), device (default cuda if available; a CUDA device asked for on a
machine without one, as lm-eval's CLI does by default, falls back to the CPU with a warning), batch_size.

How requests are run:
- loglikelihood: context + continuation, truncated on the left to max_length + 1 tokens, sorted by
  length (longest first), left-padded into batches with an attention mask; one forward per batch,
  logits only for the continuation positions.
- loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens (the first
  conditioned on the end-of-text token), scored as loglikelihood requests and summed per document.
- generate_until: prompts grouped by generation settings, sorted by length and batched through
  `HybridLM.generate` (greedy unless do_sample), stopping at the end-of-text token; the text is cut
  at the first stop string. Stop strings are applied after generation, so a batch always runs to its
  max_gen_toks (or end-of-text) first.
"""

from __future__ import annotations

import json
import logging
import sys

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hybridlm.evaluate.checkpoint import load_for_evaluation

logger = logging.getLogger(__name__)
GENERATION_KEYS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p")


def _positive_int(value, name: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        hint = " (batch_size 'auto' is not supported)" if name == "batch_size" else ""
        raise ValueError(f"{name} must be a positive integer (got {value!r}){hint}")
    return value


@register_model("hybridlm")
class HybridLMEval(TemplateLM):
    """lm-eval's interface over a `HybridLM` and its tokenizer (see the module docstring)."""

    def __init__(
        self,
        pretrained: str,
        step: int | None = None,
        tokenizer: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
    ):
        super().__init__()
        step = None if step is None else int(step)
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise, also on machines without a GPU.
            logger.warning("device %s requested but CUDA is not available; evaluating on the CPU", device)
            device = "cpu"
        loaded = load_for_evaluation(pretrained, device=device, dtype=dtype, step=step, tokenizer=tokenizer)
        self.model = loaded.model
        self.hybrid_tokenizer = loaded.tokenizer
        self.pretrained = str(pretrained)
        self._device = self.model.lm_head.weight.device
        self.batch_size = _positive_int(batch_size, "batch_size")
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, _positive_int(max_batch_size, "max_batch_size"))
        limit = self.model.config.max_seq_len
        self._max_length = limit if max_length is None else _positive_int(max_length, "max_length")
        if self._max_length > limit:
            raise ValueError(f"max_length {self._max_length} exceeds the model's max_seq_len {limit}")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")

    # What TemplateLM needs -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.hybrid_tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.hybrid_tokenizer.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.hybrid_tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.hybrid_tokenizer.decode(tokens, skip_special_tokens=True)

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(self.model.lm_head.weight.dtype),
            "model_layout": self.model.config.layout,
            "pretrained": self.pretrained,
        }

    # Scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding would produce it) for
        each (context ids, continuation ids) pair, in the order given."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            rows, continuations = [], []
            for i in chosen:
                context, continuation = pairs[i]
                if not continuation:
                    results[i] = (0.0, True)
                    continue
                if len(continuation) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                                     f"{self.max_length}: raise max_length in model_args")
                tokens = (list(context) + list(continuation))[-(self.max_length + 1) :]
                rows.append((i, tokens[:-1]))
                continuations.append(continuation)
            if not rows:
                continue
            width = max(len(inputs) for _, inputs in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for row, (_, inputs) in enumerate(rows):
                ids[row, width - len(inputs) :] = torch.tensor(inputs, dtype=torch.long)
                mask[row, width - len(inputs) :] = True
            keep = max(len(c) for c in continuations)
            logits = self.model(
                ids.to(self.device),
                attention_mask=mask.to(self.device) if not bool(mask.all()) else None,
                logits_to_keep=keep,
            ).logits
            log_probs = F.log_softmax(logits.float(), dim=-1)  # [B, keep, vocab]
            for row, ((i, _), continuation) in enumerate(zip(rows, continuations)):
                targets = torch.tensor(continuation, dtype=torch.long, device=self.device)
                row_log_probs = log_probs[row, keep - len(continuation) :]
                total = float(row_log_probs.gather(1, targets[:, None]).sum())
                greedy = bool((row_log_probs.argmax(dim=-1) == targets).all())
                results[i] = (total, greedy)
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self.score_pairs([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self.score_pairs(pairs)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # Generation --------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict) -> dict:
        unknown = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise ValueError(f"unsupported generation settings {unknown}; the hybridlm model takes "
                             f"{list(GENERATION_KEYS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", self.max_gen_toks))
        sample = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0 if sample else 0.0))
        return {
            "until": until,
            "max_new_tokens": _positive_int(max_new, "max_gen_toks"),
            "temperature": temperature if sample or temperature > 0 else 0.0,
            "top_k": gen_kwargs.get("top_k"),
            "top_p": float(gen_kwargs.get("top_p", 1.0)),
        }

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for indices in groups.values():
            settings = self._generation_settings(dict(requests[indices[0]].args[1]))
            until, max_new_tokens = settings.pop("until"), settings["max_new_tokens"]
            room = self.max_length - max_new_tokens
            if room < 1:
                raise ValueError(f"max_gen_toks {max_new_tokens} leaves no room for a prompt in max_length "
                                 f"{self.max_length}: lower max_gen_toks or raise max_length")
            prompts = {i: (self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-room:] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chosen = order[start : start + self.batch_size]
                generated = self.model.generate([prompts[i] for i in chosen], stop_token_ids=[self.eot_token_id],
                                                seed=0 if settings["temperature"] > 0 else None, **settings)
                for i, ids in zip(chosen, generated):
                    text = self.tok_decode(ids)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return outputs


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's command line with the `hybridlm` model registered (and `--model hybridlm` by default)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(arg == "--model" or arg.startswith("--model=") for arg in args):
        position = 1 if args and args[0] == "run" else 0
        args[position:position] = ["--model", "hybridlm"]
    saved = sys.argv
    sys.argv = ["lm_eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
