"""Held-out loss, bits per byte, and loss by position over long contexts.

    result = evaluate_loss(model, TokenDataset(path), seq_len=4096, batch_size=4, max_instances=64)
    result.loss, result.bits_per_byte      # nats per token, bits per UTF-8 byte of the predicted text
    result.position_loss                   # [seq_len]: mean loss at each position of the window

Instances are the evaluation windows of `EvalLoader`: seq_len + 1 tokens of the split's stream
(documents separated by EOS), spread evenly over the split. Position t of a window predicts token
t + 1 from the t + 1 tokens before it, so `position_loss` read left to right shows how the loss
falls (or, past the length a model was trained at, rises) as the context grows.

Bits per byte = sum of cross-entropy nats / (ln 2 * UTF-8 bytes of the predicted tokens), with the
tokenizer's per-token byte lengths (special tokens stand for 0 bytes): the same definition as the
trainer's validation bpb, so numbers from both are comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hybridlm.data.dataset import TokenDataset
from hybridlm.data.loader import EvalLoader
from hybridlm.evaluate.limits import LOGITS_CHUNK, check_length, check_memory, loss_memory


@dataclass
class LossResult:
    """Loss of one model on one split at one window length.

    loss: mean cross-entropy in nats per predicted token; bits_per_byte: see the module docstring.
    position_loss: float64 [seq_len], mean cross-entropy at each window position over the instances.
    """

    loss: float
    bits_per_byte: float
    tokens: int
    bytes: int
    seq_len: int
    instances: int
    split: str
    document_masking: bool
    position_loss: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "loss": self.loss,
            "bits_per_byte": self.bits_per_byte,
            "perplexity": math.exp(self.loss),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "seq_len": self.seq_len,
            "instances": self.instances,
            "split": self.split,
            "document_masking": self.document_masking,
        }


def open_dataset(name: str | Path) -> TokenDataset:
    """A prepared dataset directory, or "embedded" for the bundled stdlib corpus (prepared on first use)."""
    if str(name) == "embedded":
        from hybridlm.data.embedded import ensure_embedded_dataset

        return TokenDataset(ensure_embedded_dataset())
    return TokenDataset(name)


def check_tokenizer_matches(dataset: TokenDataset, model_vocab_size: int, tokenizer=None) -> None:
    """Refuse a dataset whose token ids the model cannot read, or one prepared with another tokenizer."""
    if dataset.vocab_size > model_vocab_size:
        raise ValueError(
            f"the dataset {dataset.path} uses a vocabulary of {dataset.vocab_size} ids but the model has only "
            f"{model_vocab_size}: it was prepared with a different tokenizer; prepare it with the model's "
            "tokenizer.json (hybridlm data prepare ... --tokenizer MODEL_DIR/tokenizer.json)"
        )
    if tokenizer is not None and tokenizer.sha256 != dataset.tokenizer.sha256:
        raise ValueError(
            f"the dataset {dataset.path} was prepared with a different tokenizer ({dataset.tokenizer_path}) than the "
            f"model's ({tokenizer.path}): the same ids would mean different text. Prepare the data with the "
            "model's tokenizer.json"
        )


@torch.no_grad()
def evaluate_loss(
    model,
    dataset: TokenDataset,
    *,
    seq_len: int,
    batch_size: int = 4,
    max_instances: int | None = None,
    split: str = "val",
    document_masking: bool = False,
    progress=None,
) -> LossResult:
    """Loss, bits per byte and per-position loss of `model` on `dataset`'s `split`.

    seq_len: window length in tokens (checked against the model's max_seq_len and free memory first).
    max_instances: evaluate this many windows spread over the split (None: all of them).
    document_masking: restart the context at every document boundary inside a window (as training
        with intra-document masking does); off by default so that positions count real context.
    progress: an optional callable(done_batches, total_batches).
    """
    config = model.config
    check_length(config, seq_len, what="seq_len")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    check_memory(
        loss_memory(config, batch_size, seq_len, dtype),
        device,
        what=f"a forward pass of {batch_size} x {seq_len} tokens",
        hint="lower --batch-size or --seq-len",
    )
    check_tokenizer_matches(dataset, config.vocab_size)
    loader = EvalLoader(dataset, seq_len=seq_len, batch_size=batch_size, split=split, max_instances=max_instances,
                        document_masking=document_masking)
    token_bytes = torch.from_numpy(np.asarray(dataset.tokenizer.token_byte_lengths, dtype=np.int64))

    was_training = model.training
    model.eval()
    position_sum = torch.zeros(seq_len, dtype=torch.float64)
    total_bytes = 0
    instances = 0
    for index, batch in enumerate(loader):
        input_ids = batch.input_ids.to(device)
        doc_ids = batch.doc_ids.to(device) if batch.doc_ids is not None else None
        hidden = model(input_ids, doc_ids=doc_ids, compute_logits=False, return_hidden_states=True).hidden_states
        labels = batch.labels.to(device)
        for start in range(0, seq_len, LOGITS_CHUNK):
            end = min(start + LOGITS_CHUNK, seq_len)
            logits = model.lm_head(hidden[:, start:end]).float()
            losses = F.cross_entropy(logits.transpose(1, 2), labels[:, start:end], reduction="none")  # [B, chunk]
            position_sum[start:end] += losses.double().sum(0).cpu()
        total_bytes += int(token_bytes[batch.labels].sum())
        instances += batch.input_ids.shape[0]
        if progress is not None:
            progress(index + 1, len(loader))
    if was_training:
        model.train()
    nats = float(position_sum.sum())
    tokens = instances * seq_len
    return LossResult(
        loss=nats / tokens,
        bits_per_byte=nats / (math.log(2) * max(total_bytes, 1)),
        tokens=tokens,
        bytes=total_bytes,
        seq_len=seq_len,
        instances=instances,
        split=split,
        document_masking=document_masking,
        position_loss=(position_sum / instances).numpy(),
    )


def binned_position_loss(position_loss: np.ndarray, bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(context lengths, mean loss) over `bins` log-spaced bins of positions, for plots and tables.

    Bin k covers context lengths [edge_k, edge_k+1); its x value is the geometric middle. Empty bins
    (at short lengths, where the log spacing is finer than one position) are dropped.
    """
    seq_len = len(position_loss)
    context = np.arange(1, seq_len + 1)
    edges = np.unique(np.round(np.geomspace(1, seq_len + 1, bins + 1)).astype(np.int64))
    xs, ys = [], []
    for low, high in zip(edges[:-1], edges[1:]):
        chosen = (context >= low) & (context < high)
        if chosen.any():
            xs.append(math.sqrt(low * (high - 1)) if high - 1 > low else float(low))
            ys.append(float(position_loss[chosen].mean()))
    return np.array(xs), np.array(ys)


def plot_loss_by_position(results: dict[str, LossResult], path: str | Path, *,
                          train_lengths: dict[str, int | None] | None = None, title: str | None = None) -> Path:
    """Write a plot of loss against context length (log x axis), one line per model.

    train_lengths: the sequence length each model was trained at, drawn as a dotted vertical line
    in the model's colour (None or missing: not drawn).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train_lengths = train_lengths or {}
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for index, (name, result) in enumerate(results.items()):
        colour = f"C{index}"
        xs, ys = binned_position_loss(result.position_loss)
        axis.plot(xs, ys, color=colour, label=f"{name} (mean {result.loss:.3f})")
        trained = train_lengths.get(name)
        if trained:
            axis.axvline(trained, color=colour, linestyle=":", linewidth=1)
    axis.set_xscale("log")
    axis.set_xlabel("context length (tokens before the predicted one)")
    axis.set_ylabel("loss (nats / token)")
    axis.set_title(title or "held-out loss by position (dotted: training length)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
