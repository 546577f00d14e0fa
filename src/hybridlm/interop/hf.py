"""The Hugging Face checkpoint format: config.json + (sharded) safetensors.

Reads model_type `olmo_hybrid` (Olmo Hybrid) and `olmo3` (Olmo 3), with both GDN conv layouts
(separate `linear_attn.{q,k,v}_conv1d.weight` as in the released files, or the fused
`linear_attn.conv1d.weight` rows q | k | v of newer transformers) and the oldest conversion
script's norm names. Writes the released layout (separate convs), loadable by transformers'
`OlmoHybridForCausalLM` / `Olmo3ForCausalLM`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from hybridlm.models.config import HybridConfig

SUPPORTED_MODEL_TYPES = ("olmo_hybrid", "olmo3")
_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_HF_LAYER_TYPES = {"linear_attention": "gdn", "full_attention": "attn", "sliding_attention": "swa"}
_OUR_LAYER_TYPES = {value: key for key, value in _HF_LAYER_TYPES.items()}
# Extension fields for layouts transformers cannot express; only hybridlm reads them.
_EXTENSION_FIELDS = {
    "gdn_use_decay": True,
    "gdn_use_output_gate": True,
    "qk_norm": "full",
    "force_last_attention": False,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is, with everything that is wrong listed."""


# Config ---------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any]) -> HybridConfig:
    """Translate a Hugging Face config.json dict into a HybridConfig, following transformers' defaults."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"unsupported model_type {model_type!r}; hybridlm loads {list(SUPPORTED_MODEL_TYPES)}"
        )
    missing = [name for name in _REQUIRED_FIELDS if hf.get(name) is None]
    if missing:
        raise CheckpointError(f"config.json ({model_type}) is missing required fields: {missing}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {hf['hidden_act']!r} is not supported; Olmo models use 'silu'")
    if hf.get("attention_bias", False):
        raise CheckpointError("attention_bias=true is not supported; Olmo attention has no biases")

    n_layers = int(hf["num_hidden_layers"])
    n_heads = int(hf["num_attention_heads"])
    layer_types = hf.get("layer_types")
    if layer_types is None:
        if model_type == "olmo_hybrid":
            layer_types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n_layers)]
            if "full_attention" not in layer_types:
                layer_types[-1] = "full_attention"
        else:
            layer_types = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n_layers)]
    unknown = sorted(set(layer_types) - set(_HF_LAYER_TYPES))
    if unknown:
        raise CheckpointError(f"unknown layer_types {unknown}; expected {list(_HF_LAYER_TYPES)}")

    rope_theta, rope_scaling = _rope_from_hf(hf, model_type)
    fields: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim"),
        mlp_hidden=int(hf["intermediate_size"]),
        layer_kinds=[_HF_LAYER_TYPES[t] for t in layer_types],
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_seq_len=int(hf.get("max_position_embeddings") or (65536 if model_type == "olmo_hybrid" else 2048)),
        # transformers' Olmo3Config defaults rms_norm_eps to 1e-5 (the 7B sets 1e-6 explicitly).
        norm_eps=float(hf.get("rms_norm_eps") or (1e-6 if model_type == "olmo_hybrid" else 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_first(hf.get("eos_token_id")),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    if model_type == "olmo3" or "sliding_attention" in layer_types:
        fields["sliding_window"] = int(hf.get("sliding_window") or 4096)
    if model_type == "olmo_hybrid":
        fields.update(
            gdn_key_heads=hf.get("linear_num_key_heads"),
            gdn_value_heads=hf.get("linear_num_value_heads"),
            gdn_key_head_dim=hf.get("linear_key_head_dim"),
            gdn_value_head_dim=hf.get("linear_value_head_dim"),
            gdn_conv_size=int(hf.get("linear_conv_kernel_dim", 4)),
            # transformers treats a missing field as True (vLLM as False); we follow transformers.
            gdn_neg_eigval=bool(hf.get("linear_allow_neg_eigval", True)),
            gdn_use_output_gate=bool(hf.get("linear_use_gate", True)),
            gdn_a_log_range=(hf.get("linear_a_log_min", 0.0), hf.get("linear_a_log_max", 16.0)),
            gdn_dt_range=(hf.get("linear_dt_min", 1e-3), hf.get("linear_dt_max", 0.1)),
            gdn_dt_init_floor=hf.get("linear_dt_init_floor", 1e-4),
        )
    for name, default in _EXTENSION_FIELDS.items():
        value = hf.get(f"hybridlm_{name}", default)
        if value != default:
            fields[name] = value
    try:
        return HybridConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"config.json describes an invalid model: {error}") from error


def _first(value):
    return value[0] if isinstance(value, list) else value


def _rope_from_hf(hf: dict[str, Any], model_type: str) -> tuple[float | None, dict[str, Any] | None]:
    """(theta or None for NoPE, YaRN-style scaling dict or None) from either config generation.

    transformers 5 writes `rope_parameters` (flat, or per layer type for Olmo 3); older files write
    `rope_theta` + `rope_scaling`. For olmo_hybrid a null or absent theta means NoPE (never an injected
    default); for olmo3 an absent theta means transformers' default of 500,000.
    """
    default_theta = 500000.0 if model_type == "olmo3" else None
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        sliding = params.get("sliding_attention") or {}
        theta = full.get("rope_theta", sliding.get("rope_theta", default_theta))
        if sliding.get("rope_theta", theta) != theta:
            raise CheckpointError("different rope_theta per layer type is not supported")
        scaling = full
    elif isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
        scaling = params
    else:
        theta = hf.get("rope_theta", default_theta)
        scaling = hf.get("rope_scaling") or {}
    scaling = {key: value for key, value in scaling.items() if key != "rope_theta"}
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling = {"rope_type": rope_type, **scaling} if rope_type != "default" else None
    return (None if theta is None else float(theta)), scaling


def config_to_hf(config: HybridConfig, torch_dtype: torch.dtype) -> dict[str, Any]:
    """The config.json for `config` (model_type olmo_hybrid if it has GDN layers, else olmo3)."""
    has_gdn = config.has_gdn
    out: dict[str, Any] = {
        "architectures": ["OlmoHybridForCausalLM" if has_gdn else "Olmo3ForCausalLM"],
        "model_type": "olmo_hybrid" if has_gdn else "olmo3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "use_cache": True,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": [_OUR_LAYER_TYPES[kind] for kind in config.layer_kinds],
        "dtype": str(torch_dtype).removeprefix("torch."),
    }
    if config.head_dim is not None and config.head_dim != config.d_model // config.n_heads:
        out["head_dim"] = config.head_dim
    if config.rope_theta is None:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": None}  # NoPE, as transformers writes it
    else:
        rope = {"rope_type": "default", "rope_theta": config.rope_theta}
        if config.rope_scaling is not None:
            rope = {**config.rope_scaling, "rope_theta": config.rope_theta}
        if has_gdn:
            out["rope_parameters"] = rope
        else:
            out["rope_parameters"] = {
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
            }
    if "swa" in config.layer_kinds:
        out["sliding_window"] = config.sliding_window
    if has_gdn:
        out.update(
            linear_num_key_heads=config.gdn_key_heads,
            linear_num_value_heads=config.gdn_value_heads,
            linear_key_head_dim=config.gdn_key_head_dim,
            linear_value_head_dim=config.gdn_value_head_dim,
            linear_conv_kernel_dim=config.gdn_conv_size,
            linear_allow_neg_eigval=config.gdn_neg_eigval,
            linear_a_log_min=config.gdn_a_log_range[0],
            linear_a_log_max=config.gdn_a_log_range[1],
            linear_dt_min=config.gdn_dt_range[0],
            linear_dt_max=config.gdn_dt_range[1],
            linear_dt_init_floor=config.gdn_dt_init_floor,
        )
    for name, default in _EXTENSION_FIELDS.items():
        value = getattr(config, name)
        if value != default:
            out[f"hybridlm_{name}"] = value
    return out


def transformers_incompatibilities(config: HybridConfig) -> list[str]:
    """Why transformers could not load this config (empty if it can)."""
    reasons = []
    if config.has_gdn and not config.has_attention:
        reasons.append("transformers' Olmo Hybrid needs at least one attention layer")
    if config.has_gdn and "swa" in config.layer_kinds:
        reasons.append("transformers' Olmo Hybrid has no sliding-window layers")
    if not config.has_gdn and config.rope_theta is None:
        reasons.append("transformers' Olmo 3 always uses RoPE")
    if not config.gdn_use_decay:
        reasons.append("transformers' Olmo Hybrid always has the GDN decay gate")
    if not config.gdn_use_output_gate:
        reasons.append("transformers' Olmo Hybrid always has the GDN output gate")
    if config.qk_norm != "full":
        reasons.append("transformers' Olmo models norm q/k over the full projection")
    return reasons


# Weights --------------------------------------------------------------------------------------
_OLD_NORM_NAMES = {"attention_layer_norm": "input_layernorm", "feedforward_layer_norm": "post_attention_layernorm"}


def normalise_state_dict(tensors: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, torch.Tensor]:
    """Map checkpoint tensor names onto ours: fused conv -> separate convs, old norm names -> current.

    Also repairs the separate convs written by transformers 5.x `save_pretrained`, which splits its
    fused conv weight into three equal parts instead of key | key | value rows (wrong whenever
    value_dim != key_dim, as in Olmo Hybrid 7B): when the three row counts are wrong but add up to
    2*key_dim + value_dim, they are concatenated back and split correctly.
    """
    key_dim, value_dim = config.gdn_key_dim, config.gdn_value_dim
    sizes = {"q_conv1d": key_dim, "k_conv1d": key_dim, "v_conv1d": value_dim}
    out = {}
    for name, tensor in tensors.items():
        for old, new in _OLD_NORM_NAMES.items():
            name = name.replace(f".{old}.", f".{new}.")
        if name.endswith("linear_attn.conv1d.weight") and tensor.shape[0] == 2 * key_dim + value_dim:
            prefix = name[: -len("conv1d.weight")]
            for part, piece in zip(sizes, torch.split(tensor, list(sizes.values()), dim=0)):
                out[f"{prefix}{part}.weight"] = piece
            continue
        out[name] = tensor
    for name in [n for n in out if n.endswith("linear_attn.q_conv1d.weight")]:
        prefix = name[: -len("q_conv1d.weight")]
        parts = [out.get(f"{prefix}{part}.weight") for part in sizes]
        if any(p is None for p in parts) or [p.shape[0] for p in parts] == list(sizes.values()):
            continue
        if sum(p.shape[0] for p in parts) == 2 * key_dim + value_dim:
            fused = torch.cat(parts, dim=0)
            for part, piece in zip(sizes, torch.split(fused, list(sizes.values()), dim=0)):
                out[f"{prefix}{part}.weight"] = piece
    return out


def load_state_dict_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model; raise CheckpointError listing missing, unexpected and mis-shaped
    tensors (nothing is loaded unless everything matches)."""
    expected = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        tensors = dict(tensors)
        tensors.setdefault("lm_head.weight", tensors.get("model.embed_tokens.weight"))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in set(expected) & set(tensors)
        if tuple(tensors[name].shape) != tuple(expected[name].shape)
    )
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"{len(items)} {title} tensors:\n    " + "\n    ".join(shown))
        raise CheckpointError("checkpoint does not match the model; nothing was loaded.\n  " + "\n  ".join(parts))
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index_path = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.exists():
                raise CheckpointError(f"{index_path} names shard {shard}, which is missing from {path}")
            tensors.update(load_file(str(shard_path)))
        return tensors
    if single.exists():
        return load_file(str(single))
    raise CheckpointError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json with its shards"
    )


def load_pretrained(path: str | Path, *, dtype: torch.dtype | str = torch.float32, device=None):
    from hybridlm.models.hybrid_lm import HybridLM

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{path} has no config.json; expected a Hugging Face format checkpoint directory")
    config = config_from_hf(json.loads(config_path.read_text()))
    tensors = normalise_state_dict(_read_safetensors(path), config)
    if dtype == "auto":
        dtype = next(iter(tensors.values())).dtype
    with torch.device("meta"):
        model = HybridLM(config)
    model = model.to_empty(device=device or "cpu").to(dtype)
    # Buffers (RoPE inverse frequencies) are not in checkpoints: rebuild them on the real device.
    if model.rotary is not None:
        _rebuild_rotary(model)
    load_state_dict_strict(model, tensors)
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def _rebuild_rotary(model) -> None:
    from hybridlm.nn.rope import rope_inverse_frequencies

    config = model.config
    device = model.lm_head.weight.device
    model.rotary.inv_freq = rope_inverse_frequencies(config.head_dim, config.rope_theta, None)[0].to(device)
    if model.rotary_full is not None:
        inv_freq, factor = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        model.rotary_full.inv_freq = inv_freq.to(device)
        model.rotary_full.attention_factor = factor


def save_pretrained(model, path: str | Path, *, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes), each file
    written under a temporary name and renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    dtype = dtype or next(iter(state.values())).dtype
    state = {name: tensor.detach().to("cpu", dtype).contiguous() for name, tensor in state.items()}

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    stale = [p for p in path.glob("model*.safetensors*")]
    if len(shards) == 1:
        _atomic(path / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata=metadata))
        written = {"model.safetensors"}
    else:
        weight_map = {}
        written = set()
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata=metadata))
            weight_map.update({tensor_name: name for tensor_name in shard})
            written.add(name)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic(path / "model.safetensors.index.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
        written.add("model.safetensors.index.json")
    for old in stale:
        if old.name not in written:
            old.unlink()
    hf_config = config_to_hf(model.config, dtype)
    _atomic(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf_config, indent=2) + "\n"))


def _atomic(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
