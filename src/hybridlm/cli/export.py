"""`hybridlm export RUN_DIR OUT_DIR`: a training run's checkpoint in the Hugging Face format."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a training run's checkpoint in the Hugging Face format",
        description="Write the newest checkpoint of a training run (or --step N) as a Hugging Face checkpoint: "
        "config.json + model.safetensors (loadable by transformers' OlmoHybridForCausalLM, or Olmo3ForCausalLM "
        "for a pure attention model, and by HybridLM.from_pretrained), plus the run's tokenizer.json and a "
        "tokenizer_config.json.",
    )
    parser.add_argument("run_dir", type=Path, help="a training run directory (or one of its checkpoints/stepN)")
    parser.add_argument("out_dir", type=Path, help="where to write the Hugging Face checkpoint")
    parser.add_argument("--step", type=int, help="export this step's checkpoint (default: the newest)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype in the safetensors file (default float32)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    try:
        out = export_run(args.run_dir, args.out_dir, step=args.step, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None, dtype: str = "float32") -> Path:
    """Write the run's checkpoint (newest or `step`) to out_dir in the Hugging Face format; returns out_dir."""
    import json
    import shutil

    import torch

    from hybridlm.train.checkpoint import load_model_from_run_dir, resolve_checkpoint

    run_root, checkpoint = resolve_checkpoint(run_dir, step)
    model = load_model_from_run_dir(checkpoint)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, dtype=getattr(torch, dtype))
    tokenizer = run_root / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
        from hybridlm.data.tokenizer import Tokenizer

        loaded = Tokenizer(tokenizer, eos_token=model.config.eos_token_id)
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": loaded.eos_token,
            "model_max_length": model.config.max_seq_len,
        }
        if loaded.pad_token_id is not None:
            tokenizer_config["pad_token"] = loaded.decode([loaded.pad_token_id])
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1) + "\n")
    return out_dir
