"""Helpers shared by commands that take a trained model."""

from __future__ import annotations

from pathlib import Path


def load_model_and_tokenizer(path: str | Path, *, device: str = "cpu", step: int | None = None):
    """(HybridLM, Tokenizer or None) from a Hugging Face checkpoint directory (config.json +
    safetensors, tokenizer.json beside it if present) or a training run directory (its newest
    checkpoint, or `step`; the run's tokenizer.json). The model is float32 in eval mode.
    """
    from hybridlm.data.tokenizer import Tokenizer
    from hybridlm.models import HybridLM
    from hybridlm.train.checkpoint import MODEL_CONFIG, TRAINER_STATE, load_model_from_run_dir

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: expected a Hugging Face checkpoint or a training run directory")
    if (path / MODEL_CONFIG).is_file() or (path / TRAINER_STATE).is_file():
        model = load_model_from_run_dir(path, step, device=device)
        run_dir = path if (path / MODEL_CONFIG).is_file() else path.parent.parent
    elif (path / "config.json").is_file():
        if step is not None:
            raise ValueError(f"{path} is a Hugging Face checkpoint; a step can only be chosen in a training run directory")
        model = HybridLM.from_pretrained(path, device=device).eval()
        run_dir = path
    else:
        raise FileNotFoundError(
            f"{path} is neither a Hugging Face checkpoint (config.json + model.safetensors) nor a training run "
            "directory (model_config.json + checkpoints/)"
        )
    tokenizer_path = run_dir / "tokenizer.json"
    tokenizer = None
    if tokenizer_path.is_file():
        tokenizer = Tokenizer(tokenizer_path, eos_token=model.config.eos_token_id)
    return model, tokenizer
