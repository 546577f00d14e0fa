"""`hybridlm info PRESET_OR_CHECKPOINT_DIR`: layers, parameter counts and decoding memory."""

from __future__ import annotations

import argparse

CONTEXTS = (4096, 8192, 32768, 65536, 131072)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="show a model's layers, parameter counts and decoding memory",
        description="Show the layer table, parameter counts (total and non-embedding) and the decoding "
        "memory per sequence of a preset (see `hybridlm info --list`) or a checkpoint directory.",
    )
    parser.add_argument("model", nargs="?", help="preset name, Hugging Face checkpoint dir or training run dir")
    parser.add_argument("--list", action="store_true", help="list the presets")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="activation dtype for the KV cache and conv state (default bfloat16)")
    parser.set_defaults(func=run)


def resolve_config(name_or_path: str):
    """A HybridConfig from a preset name, an HF checkpoint dir or a run dir (config.yaml / model/)."""
    import json
    from pathlib import Path

    from hybridlm.interop.hf import config_from_hf
    from hybridlm.models import get_preset

    path = Path(name_or_path)
    if path.is_dir():
        for candidate in (path, path / "model", path / "hf"):
            if (candidate / "config.json").exists():
                return config_from_hf(json.loads((candidate / "config.json").read_text()))
        raise SystemExit(f"error: {path} has no config.json (expected a Hugging Face checkpoint directory)")
    try:
        return get_preset(name_or_path)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from hybridlm.models import HybridLM, preset_names
    from hybridlm.models.memory import decoding_memory, human_bytes

    if args.list:
        print("\n".join(preset_names()))
        return 0
    if not args.model:
        print("error: give a preset name or a checkpoint directory (or --list)")
        return 2
    config = resolve_config(args.model)
    with torch.device("meta"):
        model = HybridLM(config)
    dtype = getattr(torch, args.dtype)

    print(f"model: {args.model}")
    print(f"layout: {config.layout}  ({sum(k == 'gdn' for k in config.layer_kinds)} GDN, "
          f"{sum(k != 'gdn' for k in config.layer_kinds)} attention)")
    print(f"d_model {config.d_model}, {config.n_layers} layers, MLP {config.mlp_hidden}, vocab {config.vocab_size}, "
          f"positions: {'NoPE' if config.rope_theta is None else f'RoPE theta {config.rope_theta:g}'}")
    print()
    print(f"{'layer':>5}  {'kind':<5} {'mixer':<46} {'params':>14}")
    for index, (kind, block) in enumerate(zip(config.layer_kinds, model.model.layers)):
        if kind == "gdn":
            mixer = (f"GDN {config.gdn_key_heads}k/{config.gdn_value_heads}v heads, K {config.gdn_key_head_dim} "
                     f"V {config.gdn_value_head_dim}, beta<{2 if config.gdn_neg_eigval else 1}"
                     f"{'' if config.gdn_use_decay else ', no decay'}")
        else:
            window = f", window {config.sliding_window}" if kind == "swa" else ""
            mixer = f"attention {config.n_heads}q/{config.n_kv_heads}kv heads x {config.head_dim}{window}"
        count = sum(p.numel() for p in block.parameters())
        print(f"{index:>5}  {kind:<5} {mixer:<46} {count:>14,}")
    total = model.num_parameters()
    non_embedding = model.num_parameters(exclude_embeddings=True)
    print()
    print(f"parameters: {total:,} total; {non_embedding:,} non-embedding (input embedding excluded, LM head counted)")
    print()
    memory = decoding_memory(config, 0, dtype=dtype)
    print(f"decoding memory per sequence ({args.dtype} activations, float32 recurrent state):")
    print(f"  recurrent state (GDN conv + recurrent, constant): {human_bytes(memory.recurrent_bytes)}")
    print(f"  KV cache: {human_bytes(memory.kv_bytes_per_token)} per token")
    print(f"  {'context':>9}  {'KV cache':>12}  {'total':>12}")
    for context in CONTEXTS:
        at = decoding_memory(config, context, dtype=dtype)
        print(f"  {context:>9,}  {human_bytes(at.kv_bytes):>12}  {human_bytes(at.total_bytes):>12}")
    return 0
