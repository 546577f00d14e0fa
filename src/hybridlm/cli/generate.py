"""`hybridlm generate CHECKPOINT_OR_RUN_DIR --prompt TEXT`: stream a continuation to stdout."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a checkpoint, streamed to stdout",
        description="Continue a prompt with a model from a Hugging Face checkpoint directory (config.json, "
        "safetensors, tokenizer.json) or a training run directory. The prompt comes from --prompt, "
        "--prompt-file, or standard input; the text is printed as it is produced.",
    )
    parser.add_argument("model", help="Hugging Face checkpoint dir or training run dir")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt from this file ('-' for standard input)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample from the top-p probability mass")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="weights and activations (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly, without a CUDA graph")
    parser.add_argument("--verbose", action="store_true",
                        help="print timing, tokens/s and the cache bytes actually allocated to stderr")
    parser.set_defaults(func=run)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file is not None and args.prompt_file != "-":
        with open(args.prompt_file, encoding="utf-8") as handle:
            return handle.read()
    return sys.stdin.read()


def run(args: argparse.Namespace) -> int:
    import torch

    from hybridlm.cli.common import load_model_and_tokenizer
    from hybridlm.generate import IncrementalDetokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    prompt = read_prompt(args)
    if not prompt:
        print("error: the prompt is empty; give --prompt TEXT, --prompt-file FILE or text on standard input",
              file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, device=device)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(f"error: no tokenizer.json in {args.model}; generate needs the checkpoint's tokenizer to read text",
              file=sys.stderr)
        return 2
    model = model.to(dtype=dtype)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2

    detokenizer = IncrementalDetokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True))

    def stream(step_tokens: list[int | None]) -> None:
        token = step_tokens[0]
        if token is not None:
            sys.stdout.write(detokenizer.push(token))
            sys.stdout.flush()

    try:
        output = model.generate(
            [prompt_ids],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            streamer=stream,
            use_cuda_graph=False if args.no_cuda_graph else None,
            return_stats=True,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sys.stdout.write(detokenizer.flush() + "\n")
    sys.stdout.flush()
    if args.verbose:
        print(output.stats.summary(), file=sys.stderr)
    return 0
