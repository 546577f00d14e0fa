"""Loading a model to evaluate: a Hugging Face checkpoint directory or a training run directory.

    loaded = load_for_evaluation("runs/demo", device="cpu")
    loaded.model, loaded.tokenizer, loaded.train_seq_len   # train_seq_len: the run's data.seq_len (None for HF)

Everything that can be checked without reading weights is checked first (the directory's kind, the
presence of weights and of a tokenizer), so a bad path fails at once with what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a HybridLM in eval mode
    tokenizer: object  # hybridlm.data.Tokenizer
    name: str  # a short label for tables: the directory's name
    path: Path
    train_seq_len: int | None  # the sequence length the run trained at, when known


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_evaluation(
    path: str | Path,
    *,
    device: str | None = None,
    dtype: str = "float32",
    step: int | None = None,
    max_seq_len: int | None = None,
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """The model (eval mode, on `device`, in `dtype`) and tokenizer of a checkpoint or run directory.

    step: a checkpoint step of a run directory (default: its newest). max_seq_len: raise (or lower) the
    model's length limit, e.g. to measure extrapolation. tokenizer: a tokenizer.json to use instead of
    the one stored beside the weights.
    """
    from hybridlm.data.tokenizer import Tokenizer
    from hybridlm.models import HybridLM
    from hybridlm.train.checkpoint import MODEL_CONFIG, TRAINER_STATE, load_model_from_run_dir, resolve_checkpoint
    from hybridlm.train.extend import training_seq_len

    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)} (got {dtype!r})")
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive integer (got {max_seq_len!r})")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: expected a Hugging Face checkpoint (config.json + "
                                "model.safetensors) or a training run directory (model_config.json + checkpoints/)")
    device = device or default_device()
    if (path / MODEL_CONFIG).is_file() or (path / TRAINER_STATE).is_file():
        run_dir, _ = resolve_checkpoint(path, step)  # raises when the run has no complete checkpoint
        load = lambda: load_model_from_run_dir(path, step, device=device)  # noqa: E731
        train_seq_len = training_seq_len(run_dir)
        weights_dir = run_dir
    elif (path / "config.json").is_file():
        if step is not None:
            raise ValueError(f"{path} is a Hugging Face checkpoint; a step can only be chosen in a training run "
                             "directory")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(f"{path} has config.json but no weights: expected model.safetensors (or shards "
                                    "named in model.safetensors.index.json)")
        load = lambda: HybridLM.from_pretrained(path, device=device)  # noqa: E731
        train_seq_len = None
        weights_dir = path
    else:
        raise FileNotFoundError(
            f"{path} is neither a Hugging Face checkpoint (config.json + model.safetensors) nor a training run "
            "directory (model_config.json + checkpoints/)"
        )
    tokenizer_path = Path(tokenizer) if tokenizer is not None else weights_dir / "tokenizer.json"
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"no tokenizer at {tokenizer_path}: evaluation needs the model's tokenizer.json; "
                                "put it beside the weights or pass a tokenizer path")
    model = load().to(DTYPES[dtype]).eval()
    if max_seq_len is not None:
        model.config.max_seq_len = max_seq_len
    loaded_tokenizer = Tokenizer(tokenizer_path, eos_token=model.config.eos_token_id)
    return LoadedModel(model, loaded_tokenizer, weights_dir.resolve().name, path, train_seq_len)
