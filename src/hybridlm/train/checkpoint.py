"""Training checkpoints: atomic, resumable, world-size independent.

Layout of one checkpoint, RUN_DIR/checkpoints/step{N:07d}/:

    .metadata, __*_*.distcp     model and optimizer state (torch.distributed.checkpoint; one file per
                                rank, reshardable: a run saved on 2 GPUs resumes on 1 and back)
    rng-rank{R:05d}.pt          each rank's Python, NumPy and torch (CPU and CUDA) RNG states
    trainer_state.json          step, tokens, data-loader position, skip-step history (written last)

Everything is written into RUN_DIR/checkpoints/.step{N:07d}.tmp-XXXX and renamed into place only
once every rank has finished, so a crash or a full disk mid-save leaves no directory that `--resume`
would pick up: a `step*` directory is complete by construction (and must hold trainer_state.json).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hybridlm.train.distributed import DistributedEnv, all_reduce_sum, broadcast_object

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
_NAME = re.compile(r"^step(\d{7,})$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous checkpoints are intact."""


def checkpoint_name(step: int) -> str:
    return f"step{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first: (step, directory)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete temporary directories left by an interrupted save; returns what was removed."""
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    if root.is_dir():
        for path in root.glob(".step*.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# Save ------------------------------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    """Every small file of a checkpoint goes through here (tests simulate a full disk by patching it)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _torch_bytes(value: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    env: DistributedEnv,
    *,
    keep_last: int = 0,
) -> Path:
    """Write checkpoint `step` atomically on all ranks and return its directory.

    trainer_state must be JSON-serialisable (rank 0's is written). keep_last > 0 deletes all but the
    newest keep_last checkpoints afterwards. On any write error (full disk, permissions) the
    temporary directory is removed on every rank and CheckpointWriteError is raised.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp_name = None
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp_name = tempfile.mkdtemp(dir=root, prefix=f".{checkpoint_name(step)}.tmp-")
    tmp = Path(broadcast_object(tmp_name, env))

    error: BaseException | None = None
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
        _write_file(tmp / f"rng-rank{env.rank:05d}.pt", _torch_bytes(rng_state()))
        if env.is_main:
            state = {"step": step, "world_size": env.world_size, **trainer_state}
            _write_file(tmp / TRAINER_STATE, (json.dumps(state, indent=1) + "\n").encode())
    except Exception as caught:  # noqa: BLE001 - reported on every rank below
        error = caught
    failures = all_reduce_sum([1.0 if error is not None else 0.0], env)[0]
    if failures:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = _describe(error) if error is not None else "another rank failed to write its part"
        raise CheckpointWriteError(
            error.errno if isinstance(error, OSError) and error.errno else errno.EIO,
            f"could not write checkpoint step {step} under {root}: {reason}. Nothing was written in its "
            f"place; earlier checkpoints are intact. Free disk space (or fix permissions) and resume "
            f"with --resume",
        ) from error

    if env.is_main:
        if final.exists():  # re-saving a step (resumed at a checkpoint): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for _, old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    all_reduce_sum([0.0], env)  # everyone waits until the checkpoint is in place
    return final


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "no space left on device"
    return f"{type(error).__name__}: {error}"


# Load ------------------------------------------------------------------------------------------
def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistributedEnv
) -> dict[str, Any]:
    """Restore model (and optimizer) state and this rank's RNG from a checkpoint directory; returns
    the trainer state (step, tokens, loader, ...). Works with any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (it has no {TRAINER_STATE})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    rng_file = path / f"rng-rank{env.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def resolve_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory (newest checkpoint, or `step`) or a
    checkpoint directory itself."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path.parent.parent, path
    if not (path / MODEL_CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} is neither a training run directory (with {MODEL_CONFIG} and {CHECKPOINTS}/) nor a checkpoint"
        )
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise FileNotFoundError(f"run directory {path} has no complete checkpoint under {CHECKPOINTS}/")
    if step is None:
        return path, checkpoints[-1][1]
    for found_step, directory in checkpoints:
        if found_step == step:
            return path, directory
    raise FileNotFoundError(f"run directory {path} has no checkpoint of step {step}; it has {[s for s, _ in checkpoints]}")


def load_model_from_run_dir(path: str | Path, step: int | None = None, *, device: str | torch.device = "cpu"):
    """The trained HybridLM (float32) of a run directory's newest checkpoint (or of `step`), or of a
    checkpoint directory. For export, generation and evaluation."""
    from hybridlm.models import HybridConfig, HybridLM

    run_dir, checkpoint = resolve_checkpoint(path, step)
    config = HybridConfig.from_dict(json.loads((run_dir / MODEL_CONFIG).read_text()))
    with torch.device(device):
        model = HybridLM(config)
    load_model_state(checkpoint, model)
    return model.eval()


def load_model_state(path: str | Path, model: nn.Module) -> None:
    """Only the model weights of a checkpoint directory (any world size), into an unsharded model."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
