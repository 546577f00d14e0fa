"""The training loop, in one function you can read top to bottom: `train(config, run_dir)`.

One optimizer step:
    1. set the learning rate of this step from the schedule
    2. take this rank's micro-batches of the global batch (the loader shards it over ranks)
    3. forward and backward each micro-batch; the loss is the float32 cross-entropy (+ z-loss)
       summed over target tokens and divided by the global batch's token count, so the gradient
       is the same whatever the number of ranks and micro-batches
    4. clip the gradient; skip the step if the loss or gradient norm is not finite or spikes
       (SkipStepGuard); otherwise apply AdamW
    5. log; evaluate (val loss and bits per byte) and checkpoint when due

A skipped step still counts: the step counter, the schedule and the data move on (its batch is
consumed with a zero update), so a resumed or a distributed run stays aligned with the plan.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridlm.train.checkpoint import (
    MODEL_CONFIG,
    latest_checkpoint,
    load_checkpoint,
    load_model_from_run_dir,
    remove_incomplete,
    save_checkpoint,
)
from hybridlm.train.config import ConfigError, TrainConfig, tokenizer_vocab_to_model_vocab
from hybridlm.train.distributed import (
    DistributedEnv,
    all_reduce_sum,
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    autocast_context,
    barrier,
    init_distributed,
    set_gradient_sync,
    shutdown_distributed,
)
from hybridlm.train.extend import load_initial_weights
from hybridlm.train.logging import MetricsLogger, plot_loss_curve
from hybridlm.train.loss import IGNORE_INDEX, model_loss_sums
from hybridlm.train.optim import SkipStepGuard, build_optimizer, lr_at, wsds_decay_points

CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"


class TrainingError(RuntimeError):
    """Training cannot start or continue as configured (bad data, run directory, sizes, ...)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    first_val_loss: float | None
    skipped_steps: int
    checkpoint: Path | None
    sample: str | None
    sample_error: str | None
    seconds: float


def train(
    config: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool | None = None, echo=print
) -> TrainResult:
    """Train as `config` says, writing everything into `run_dir`; with resume, continue from its
    newest complete checkpoint (bit-identical on CPU to a run that was never interrupted).

    progress: show a progress bar (None: when stderr is a terminal); echo: where log lines go.
    Under torchrun every rank calls this; rank 0 alone writes logs, metrics and plots.
    """
    started = time.perf_counter()
    config.validate()
    env = init_distributed(config.trainer.device)
    try:
        return _train(config, Path(run_dir), env, resume, progress, echo if env.is_main else _silent, started)
    finally:
        shutdown_distributed(env)


def _silent(*args, **kwargs) -> None:
    pass


def _train(config, run_dir, env: DistributedEnv, resume, progress, echo, started) -> TrainResult:
    trainer, data_config, optim_config = config.trainer, config.data, config.optimizer
    _prepare_run_dir(run_dir, env)

    # Data and tokenizer -------------------------------------------------------------------------
    dataset = _open_dataset(data_config.dataset, env)
    tokenizer = dataset.tokenizer
    model_config = _resolve_model_config(config, tokenizer)
    train_loader, eval_loader = _build_loaders(config, dataset, env)
    token_bytes = torch.from_numpy(np.asarray(tokenizer.token_byte_lengths, dtype=np.int64))

    # Model, applied parallelism, optimizer -----------------------------------------------------------
    from hybridlm.models import HybridLM

    _seed_everything(trainer.seed)
    with torch.device(env.device):
        model = HybridLM(model_config)
    if trainer.init_from:
        echo(load_initial_weights(model, trainer.init_from, tokenizer))
    n_params = model.num_parameters(exclude_embeddings=True)
    compute_dtype = _compute_dtype(trainer.precision, env)
    if trainer.activation_checkpointing:
        apply_activation_checkpointing(model)
    if trainer.compile:
        apply_compile(model)
    if env.is_distributed:
        apply_fsdp(model, param_dtype=compute_dtype)
    model.train()
    optimizer = build_optimizer(model, optim_config)
    guard = SkipStepGuard(
        sigma=optim_config.skip_sigma,
        window=optim_config.skip_window,
        min_history=optim_config.skip_min_history,
        enabled=optim_config.skip_step,
    )

    # Run directory contents and resume ------------------------------------------------------------
    step, tokens, skipped = 0, 0, 0
    checkpoint_dir = latest_checkpoint(run_dir) if resume else None
    if env.is_main:
        remove_incomplete(run_dir)
        (run_dir / CONFIG_FILE).write_text(config.to_yaml())
        (run_dir / MODEL_CONFIG).write_text(json.dumps(model_config.to_dict(), indent=1) + "\n")
        shutil.copyfile(tokenizer.path, run_dir / TOKENIZER_FILE)
    if checkpoint_dir is not None:
        state = load_checkpoint(checkpoint_dir, model, optimizer, env)
        step, tokens, skipped = state["step"], state["tokens"], state.get("skipped_steps", 0)
        train_loader.load_state_dict(state["loader"])
        guard.load_state_dict(state["skip_guard"])
        echo(f"resumed from {checkpoint_dir} (step {step}, {tokens:,} tokens)")
    elif resume:
        echo(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
    logger = MetricsLogger(run_dir, config, enabled=env.is_main, truncate_after_step=step)

    tokens_per_step = data_config.batch_size * data_config.seq_len
    echo(
        f"model {config.model.preset}: {model_config.layout} ({model_config.n_layers} layers, d {model_config.d_model}, "
        f"vocab {model_config.vocab_size}), {n_params:,} non-embedding parameters; device {env.device}"
        f"{f' x {env.world_size} ranks (FSDP)' if env.is_distributed else ''}, "
        f"{'bfloat16' if compute_dtype else 'float32'}; {trainer.steps} steps x {tokens_per_step:,} tokens"
    )

    # The loop ----------------------------------------------------------------------------------------
    show_bar = env.is_main and (sys.stderr.isatty() if progress is None else progress)
    bar = _progress_bar(trainer.steps, step) if show_bar else None
    window_tokens, window_time = 0, 0.0
    train_loss = val_loss = val_bpb = first_val_loss = None
    last_checkpoint = checkpoint_dir
    # WSD-S: evaluate and checkpoint before and after every decay ({step: (label, period)}).
    decay_points = wsds_decay_points(config.schedule)
    while step < trainer.steps:
        step_started = time.perf_counter()
        lr = lr_at(step, optim_config.lr, trainer.steps, config.schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr

        batches = train_loader.next_step()
        local_count = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)
        (global_count,) = all_reduce_sum([float(local_count)], env)
        # Each rank's gradient is averaged over ranks by FSDP: scale so the result is the global mean.
        scale = env.world_size / global_count
        ce_sum = z_sum = 0.0
        for index, batch in enumerate(batches):
            set_gradient_sync(model, index == len(batches) - 1)
            with autocast_context(env, compute_dtype, sharded=env.is_distributed):
                sums = model_loss_sums(
                    model,
                    batch.input_ids.to(env.device),
                    batch.labels,
                    doc_ids=batch.doc_ids.to(env.device) if batch.doc_ids is not None else None,
                    gdn_impl=trainer.gdn_impl,
                    attn_impl=trainer.attn_impl,
                )
            loss = (sums.cross_entropy + optim_config.z_loss * sums.z_loss) * scale
            loss.backward()
            ce_sum += sums.cross_entropy.item()
            z_sum += sums.z_loss.item()
        ce_total, z_total = all_reduce_sum([ce_sum, z_sum], env)
        train_loss = ce_total / global_count
        grad_norm = _clip_gradients(model, optim_config.grad_clip)

        reason = guard.check(train_loss, grad_norm)
        if reason is None:
            optimizer.step()
        else:
            skipped += 1
            _write_line(bar, echo, f"step {step + 1}: skipped ({reason})")
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        window_time += time.perf_counter() - step_started

        record: dict[str, Any] = {}
        last = step == trainer.steps
        decay_point = decay_points.get(step)
        evaluate_now = bool(trainer.eval_every and step % trainer.eval_every == 0) or last or decay_point is not None
        if step % trainer.log_every == 0 or step == 1 or evaluate_now:
            record.update(
                train_loss=train_loss,
                z_loss=z_total / global_count,
                lr=lr,
                grad_norm=grad_norm,
                tokens_per_s=window_tokens / max(window_time, 1e-9),
                skipped_steps=skipped,
            )
            if reason is not None:
                record["skipped"] = True
            if env.device.type == "cuda":
                record["max_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
            window_tokens, window_time = 0, 0.0
        if evaluate_now:
            val_loss, val_bpb = _evaluate(model, eval_loader, token_bytes, env, compute_dtype, trainer.gdn_impl, trainer.attn_impl)
            first_val_loss = val_loss if first_val_loss is None else first_val_loss
            record.update(val_loss=val_loss, val_bpb=val_bpb)
            if decay_point is not None:
                record.update(decay_point=decay_point[0], period=decay_point[1])
            _write_line(bar, echo, f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, val bpb {val_bpb:.4f}")
        if record:
            logger.log(step=step, tokens=tokens, elapsed_s=time.perf_counter() - started, **record)
        if bar is not None:
            if "tokens_per_s" in record:
                bar.set_postfix_str(f"loss {train_loss:.3f}, {record['tokens_per_s']:,.0f} tok/s", refresh=False)
            bar.update(1)
        elif "tokens_per_s" in record:
            echo(f"step {step}/{trainer.steps}: loss {train_loss:.4f}, lr {lr:.3g}, {record['tokens_per_s']:,.0f} tok/s")

        if (trainer.checkpoint_every and step % trainer.checkpoint_every == 0) or last or decay_point is not None:
            trainer_state = {
                "tokens": tokens,
                "skipped_steps": skipped,
                "loader": train_loader.state_dict(),
                "skip_guard": guard.state_dict(),
            }
            last_checkpoint = save_checkpoint(run_dir, step, model, optimizer, trainer_state, env, keep_last=trainer.keep_last)
            if env.is_main:
                plot_loss_curve(run_dir)
    if bar is not None:
        bar.close()
    logger.close()
    if env.is_main:
        plot_loss_curve(run_dir)

    # The sample, from the final checkpoint ------------------------------------------------------------
    sample = sample_error = None
    if trainer.sample_tokens and env.is_main and last_checkpoint is not None:
        # The run and its checkpoints are complete here; a failing sample is reported, not allowed to
        # hide the run's results.
        try:
            sample = generate_sample(run_dir, tokenizer, trainer.sample_prompt, trainer.sample_tokens, env.device)
        except Exception as error:  # noqa: BLE001 - reported through TrainResult.sample_error
            sample_error = f"{type(error).__name__}: {error}"
    barrier(env)
    return TrainResult(
        run_dir=run_dir,
        step=step,
        tokens=tokens,
        train_loss=train_loss,
        val_loss=val_loss,
        val_bpb=val_bpb,
        first_val_loss=first_val_loss,
        skipped_steps=skipped,
        checkpoint=last_checkpoint,
        sample=sample,
        sample_error=sample_error,
        seconds=time.perf_counter() - started,
    )


# Pieces of the loop --------------------------------------------------------------------------------
def _clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (0: no clipping) and return the norm before clipping."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def _evaluate(
    model, loader, token_bytes: torch.Tensor, env: DistributedEnv, compute_dtype, gdn_impl: str, attn_impl: str = "auto"
) -> tuple[float, float]:
    """(mean cross-entropy in nats per token, bits per byte) on the held-out instances.

    Bits per byte = sum of cross-entropy nats / (ln 2 * UTF-8 bytes of the target tokens), with the
    tokenizer's per-token byte lengths (special tokens stand for 0 bytes).
    """
    model.eval()
    ce_sum = count = n_bytes = 0.0
    for batch in loader:
        with autocast_context(env, compute_dtype, sharded=env.is_distributed):
            sums = model_loss_sums(
                model,
                batch.input_ids.to(env.device),
                batch.labels,
                doc_ids=batch.doc_ids.to(env.device) if batch.doc_ids is not None else None,
                gdn_impl=gdn_impl,
                attn_impl=attn_impl,
            )
        ce_sum += sums.cross_entropy.item()
        count += sums.count
        n_bytes += float(token_bytes[batch.labels.clamp(min=0)].sum())
    ce_sum, count, n_bytes = all_reduce_sum([ce_sum, count, n_bytes], env)
    model.train()
    return ce_sum / count, ce_sum / (math.log(2) * max(n_bytes, 1.0))


def generate_sample(run_dir: Path, tokenizer, prompt: str, max_new_tokens: int, device) -> str:
    """Text continued from `prompt` by the newest checkpoint of the run (greedy, fixed seed)."""
    model = load_model_from_run_dir(run_dir, device=device)
    prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_token_id]
    generated = model.generate(
        torch.tensor([prompt_ids], device=device),
        max_new_tokens=max_new_tokens,
        temperature=0.8,
        top_k=50,
        seed=0,
    )[0]
    return prompt + tokenizer.decode(generated, skip_special_tokens=True)


# Setup -----------------------------------------------------------------------------------------------
def _prepare_run_dir(run_dir: Path, env: DistributedEnv) -> None:
    """Create the run directory and prove it is writable before any work is done."""
    if not env.is_main:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise TrainingError(
            f"the run directory {run_dir} is not writable ({error.strerror or error}); choose another with "
            f"--run-dir DIR or fix its permissions"
        ) from None


def _open_dataset(name: str, env: DistributedEnv):
    from hybridlm.data.dataset import TokenDataset

    if name == "embedded":
        from hybridlm.data.embedded import ensure_embedded_dataset

        # Rank 0 prepares (once; later runs find it ready), the others then open the finished copy.
        if env.is_main:
            path = ensure_embedded_dataset(progress=True)
        barrier(env)
        if not env.is_main:
            path = ensure_embedded_dataset(progress=False)
    else:
        path = Path(name)
    try:
        return TokenDataset(path)
    except (FileNotFoundError, ValueError) as error:
        raise TrainingError(f"data.dataset={name!r}: {error}") from None


def _resolve_model_config(config: TrainConfig, tokenizer):
    """The model's HybridConfig, sized for the tokenizer, checked against the data settings."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    model_vocab = tokenizer_vocab_to_model_vocab(tokenizer.vocab_size)
    try:
        model_config = config.model_config(vocab_size=model_vocab, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"the model's vocab_size {model_config.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} ids, {tokenizer.path}): token ids would fall outside the embedding. Remove "
            f"model.vocab_size (it then defaults to {model_vocab}) or set it to at least {tokenizer.vocab_size}"
        )
    if config.data.seq_len > model_config.max_seq_len:
        raise ConfigError(
            f"data.seq_len {config.data.seq_len} is longer than the model supports (max_seq_len "
            f"{model_config.max_seq_len}); lower data.seq_len or set model.overrides.max_seq_len"
        )
    return model_config


def _build_loaders(config: TrainConfig, dataset, env: DistributedEnv):
    from hybridlm.data.loader import EvalLoader, TrainLoader

    data, trainer = config.data, config.trainer
    if data.batch_size % env.world_size:
        raise ConfigError(
            f"data.batch_size {data.batch_size} must be a multiple of the number of ranks ({env.world_size})"
        )
    micro = trainer.micro_batch_size or data.batch_size // env.world_size
    try:
        train_loader = TrainLoader(
            dataset,
            seq_len=data.seq_len,
            global_batch_size=data.batch_size,
            micro_batch_size=micro,
            rank=env.rank,
            world_size=env.world_size,
            seed=data.seed,
            document_masking=data.intra_document_masking,
        )
        available = dataset.split("val").check_instances(data.seq_len)
    except ValueError as error:
        raise TrainingError(f"data: {error}") from None
    # Every rank must run the same number of forward passes (FSDP's collectives): a multiple of the ranks.
    eval_instances = min(trainer.eval_sequences or available, available) // env.world_size * env.world_size
    if eval_instances == 0:
        raise TrainingError(
            f"the val split of {dataset.path} holds {available} instances of seq_len {data.seq_len}, fewer than the "
            f"{env.world_size} ranks: prepare more validation data or lower data.seq_len"
        )
    eval_loader = EvalLoader(
        dataset,
        seq_len=data.seq_len,
        batch_size=micro,
        max_instances=eval_instances,
        rank=env.rank,
        world_size=env.world_size,
        document_masking=data.intra_document_masking,
    )
    return train_loader, eval_loader


def _compute_dtype(precision: str, env: DistributedEnv) -> torch.dtype | None:
    if precision == "bfloat16" or (precision == "auto" and env.device.type == "cuda"):
        return torch.bfloat16
    return None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress_bar(total: int, initial: int):
    """A console progress bar: steps, loss, tokens/s and (tqdm's) ETA."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc="train")


def _write_line(bar, echo, line: str) -> None:
    if bar is not None:
        bar.write(line)
    else:
        echo(line)
