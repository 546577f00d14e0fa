"""Continuing from another model's weights, and the position-encoding changes of context extension.

Two training options serve long-context extension (Olmo Hybrid's stage 3, architecture.md §16.3):

    trainer.init_from: RUN_DIR | CHECKPOINT_DIR | HF_DIR
        Start from that model's weights and architecture (its HybridConfig; `model.preset` is not used
        and `model.overrides` may change only what keeps parameter shapes, e.g. max_seq_len), with a
        fresh optimizer and schedule at step 0. The dataset must use the model's tokenizer.
    model.rope: keep | drop | yarn
        keep: the positional encoding as the architecture has it (default).
        drop: DRoPE, as Olmo Hybrid before its 64K stage: remove RoPE from every attention layer
              (rope_theta None, no scaling), then continue training without positional encoding.
        yarn: keep RoPE and apply YaRN to the full-attention layers (the paper's Hybrid-YaRN variant):
              factor = data.seq_len / the source run's training length, original_max_position_embeddings
              = that length, beta_fast 32, beta_slow 1. Needs init_from to be a training run (whose
              config.yaml records its length); otherwise give model.overrides.rope_scaling yourself.

The weights do not depend on the positional encoding (RoPE's frequencies are buffers, not
parameters), so any of the three loads the same state dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hybridlm.train.config import ConfigError

ROPE_MODES = ("keep", "drop", "yarn")
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@dataclass
class InitSource:
    """A model to start from: its directory, architecture, training length (runs only) and tokenizer."""

    path: Path
    kind: str  # "run" (a run or checkpoint directory) or "hf"
    config: object  # HybridConfig
    trained_seq_len: int | None
    tokenizer_path: Path | None


def training_seq_len(run_dir: str | Path) -> int | None:
    """data.seq_len of a run directory's config.yaml (None when there is none)."""
    import yaml

    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        return None
    values = yaml.safe_load(config_path.read_text()) or {}
    seq_len = (values.get("data") or {}).get("seq_len")
    return seq_len if isinstance(seq_len, int) else None


def inspect_init_source(path: str | Path) -> InitSource:
    """Read the architecture of a run directory, checkpoint directory or Hugging Face directory (no weights)."""
    from hybridlm.interop.hf import config_from_hf
    from hybridlm.models import HybridConfig
    from hybridlm.train.checkpoint import MODEL_CONFIG, TRAINER_STATE, resolve_checkpoint

    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"trainer.init_from={str(path)!r} is not a directory: expected a training run directory, "
                         "one of its checkpoints/stepN directories, or a Hugging Face checkpoint directory")
    if (path / MODEL_CONFIG).is_file() or (path / TRAINER_STATE).is_file():
        try:
            run_dir, _ = resolve_checkpoint(path)
        except FileNotFoundError as error:
            raise ConfigError(f"trainer.init_from: {error}") from None
        config = HybridConfig.from_dict(json.loads((run_dir / MODEL_CONFIG).read_text()))
        tokenizer = run_dir / "tokenizer.json"
        return InitSource(path, "run", config, training_seq_len(run_dir), tokenizer if tokenizer.is_file() else None)
    if (path / "config.json").is_file():
        config = config_from_hf(json.loads((path / "config.json").read_text()))
        tokenizer = path / "tokenizer.json"
        return InitSource(path, "hf", config, None, tokenizer if tokenizer.is_file() else None)
    raise ConfigError(f"trainer.init_from={str(path)!r} holds neither a training run (model_config.json + "
                      "checkpoints/) nor a Hugging Face checkpoint (config.json + model.safetensors)")


def apply_rope_mode(config, mode: str, *, seq_len: int, source: InitSource | None, explicit_scaling: bool = False):
    """The HybridConfig with `model.rope` applied (see the module docstring)."""
    if mode not in ROPE_MODES:
        raise ConfigError(f"model.rope must be one of {list(ROPE_MODES)} (got {mode!r})")
    if mode == "keep":
        return config
    if mode == "drop":
        return config.replace(rope_theta=None, rope_scaling=None)
    if explicit_scaling:
        raise ConfigError("model.rope=yarn derives rope_scaling itself; remove model.overrides.rope_scaling, or keep "
                         "your own scaling with model.rope=keep")
    if config.rope_theta is None:
        raise ConfigError("model.rope=yarn rescales RoPE, but this model has no RoPE (rope_theta is null, NoPE); "
                         "use model.rope=drop or keep")
    original = source.trained_seq_len if source is not None else None
    if original is None:
        raise ConfigError("model.rope=yarn needs the length the model was trained at: set trainer.init_from to its "
                         "training run directory, or set model.overrides.rope_scaling={rope_type: yarn, factor: F, "
                         "original_max_position_embeddings: L, beta_fast: 32, beta_slow: 1} with model.rope=keep")
    if seq_len <= original:
        raise ConfigError(f"model.rope=yarn extends the context, but data.seq_len {seq_len} is not longer than the "
                         f"source's training length {original}")
    scaling = {
        "rope_type": "yarn",
        "factor": seq_len / original,
        "original_max_position_embeddings": original,
        "beta_fast": YARN_BETA_FAST,
        "beta_slow": YARN_BETA_SLOW,
    }
    return config.replace(rope_scaling=scaling)


def load_initial_weights(model, path: str | Path, tokenizer=None) -> str:
    """Copy the weights of `path` (see inspect_init_source) into `model`; returns a line saying what was loaded.

    tokenizer: the training data's tokenizer; refused when the source stores a different tokenizer.json.
    Raises ConfigError (a ValueError) for anything that does not match.
    """
    from hybridlm.models import HybridLM
    from hybridlm.train.checkpoint import load_model_from_run_dir

    source = inspect_init_source(path)
    if tokenizer is not None and source.tokenizer_path is not None:
        from hybridlm.data.tokenizer import file_sha256

        if file_sha256(source.tokenizer_path) != tokenizer.sha256:
            raise ConfigError(f"trainer.init_from: {source.tokenizer_path} differs from the dataset's tokenizer "
                             f"({tokenizer.path}); continue training on data prepared with the model's tokenizer")
    device = model.lm_head.weight.device
    if source.config.vocab_size != model.config.vocab_size:
        raise ConfigError(f"trainer.init_from: the source's vocab_size {source.config.vocab_size} differs from the "
                         f"model's {model.config.vocab_size}; remove model.vocab_size and vocab overrides")
    if source.kind == "hf":
        weights = HybridLM.from_pretrained(source.path, device=device)
    else:
        weights = load_model_from_run_dir(source.path, device=device)
    try:
        model.load_state_dict(weights.state_dict())
    except RuntimeError as error:
        raise ConfigError(f"trainer.init_from: the weights of {path} do not fit the configured model (an override "
                         f"changed a parameter shape?): {error}") from None
    rope = "NoPE" if model.config.rope_theta is None else f"RoPE theta {model.config.rope_theta:g}"
    if model.config.rope_scaling:
        scaling = model.config.rope_scaling
        rope += f", YaRN factor {scaling['factor']:g} over {scaling['original_max_position_embeddings']} tokens"
    return f"initialised from {path} ({rope}; fresh optimizer)"
