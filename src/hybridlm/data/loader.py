"""Batches of fixed-length instances for training and evaluation.

An instance is a window of seq_len + 1 tokens of a split's stream (documents separated by EOS):
instance i starts at token i * seq_len, so consecutive windows share one token and every token
after the first is a label exactly once. inputs = window[:-1], labels = window[1:].

Training order: the instances of epoch e in a permutation drawn from (seed, e); the epochs follow
each other as one endless stream of instances, cut into global batches of G instances. A global
batch never skips or repeats an instance of the stream: at an epoch's end it is completed from
the next epoch. Rank r of W takes instances [r * G/W, (r + 1) * G/W) of each global batch, so the
ranks together see exactly what one process would, and may cut its share into micro-batches for
gradient accumulation. The loader's state is (epoch, position), position counting the instances
of the epoch consumed by all ranks; it changes only by whole global batches (optimizer steps).

Document masking (optional): doc_ids[b, t] numbers the documents inside each row, starting at 0;
a new document starts right after each EOS input token (the EOS belongs to the document it ends).
Attention layers build their block-diagonal causal mask from doc_ids; GDN layers take the
equivalent `cu_seqlens` over the flattened batch (cu_seqlens_from_document_ids).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybridlm.data.dataset import TokenDataset, TokenSplit
from hybridlm.models.hybrid_lm import cu_seqlens_from_doc_ids


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """int64 [b, L]: per-row document number of each position; a new document starts after each EOS.

    Args:
        input_ids: int [b, L].
    """
    is_eos = (input_ids == eos_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos


# The model's own conversion (every row start is a boundary; [0, ..., b * L], int64, on doc_ids' device),
# under the data package's name.
cu_seqlens_from_document_ids = cu_seqlens_from_doc_ids


@dataclass
class Batch:
    """One (micro-)batch. All tensors int64 on the CPU.

    input_ids: [b, L]; labels: [b, L] (labels[:, t] = token after input_ids[:, t]);
    doc_ids: [b, L] document numbers per row, or None when document masking is off.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with its tensors on `device`."""
        doc_ids = None if self.doc_ids is None else self.doc_ids.to(device, non_blocking=non_blocking)
        return Batch(self.input_ids.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking), doc_ids)

    def cu_seqlens(self) -> torch.Tensor:
        """int64 [N + 1] over the flattened batch (see cu_seqlens_from_document_ids)."""
        if self.doc_ids is None:
            raise ValueError("this batch has no doc_ids: build the loader with document_masking=True")
        return cu_seqlens_from_document_ids(self.doc_ids)


def _open_split(dataset: TokenDataset | str | Path, split: str) -> tuple[TokenDataset, TokenSplit]:
    if not isinstance(dataset, TokenDataset):
        dataset = TokenDataset(dataset)
    return dataset, dataset.split(split)


def _make_batch(split: TokenSplit, indices: np.ndarray, seq_len: int, document_masking: bool) -> Batch:
    windows = np.stack([split.instance(int(i), seq_len) for i in indices]).astype(np.int64)
    tokens = torch.from_numpy(windows)
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    doc_ids = document_ids(input_ids, split.eos_id) if document_masking else None
    return Batch(input_ids, labels, doc_ids)


class TrainLoader:
    """Shuffled, resumable, rank-sharded training batches from a prepared dataset.

    Args:
        dataset: a TokenDataset or the path of a prepared dataset directory.
        seq_len: tokens per row L.
        global_batch_size: instances per optimizer step over all ranks (G); divisible by world_size.
        micro_batch_size: rows per micro-batch (default: the rank's whole share G / world_size,
            which it must divide).
        rank, world_size: this process's place among the data-parallel ranks.
        seed: fixes the order (a permutation per epoch drawn from (seed, epoch)).
        split: "train" (default) or "val".
        document_masking: also return doc_ids.

    next_step() returns this rank's micro-batches for one optimizer step and advances the state.
    """

    def __init__(
        self,
        dataset: TokenDataset | str | Path,
        *,
        seq_len: int,
        global_batch_size: int,
        micro_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        split: str = "train",
        document_masking: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"world_size={world_size}")
        self.rank_batch_size = global_batch_size // world_size
        micro_batch_size = micro_batch_size or self.rank_batch_size
        if self.rank_batch_size % micro_batch_size:
            raise ValueError(f"micro_batch_size={micro_batch_size} must divide the per-rank batch "
                             f"{self.rank_batch_size} (= global_batch_size {global_batch_size} / "
                             f"world_size {world_size})")
        self.dataset, self.split = _open_split(dataset, split)
        self.instances_per_epoch = self.split.check_instances(seq_len)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.document_masking = document_masking
        self.epoch = 0
        self.position = 0
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def tokens_per_step(self) -> int:
        """Label tokens in one global batch: global_batch_size * seq_len."""
        return self.global_batch_size * self.seq_len

    def permutation(self, epoch: int) -> np.ndarray:
        """int64 [instances_per_epoch]: the order of the instances in `epoch`."""
        if epoch not in self._permutations:
            self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.instances_per_epoch)
        return self._permutations[epoch]

    def _instances(self, first: int, count: int) -> np.ndarray:
        """Instance indices at positions [first, first + count) of the endless stream of epochs."""
        positions = np.arange(first, first + count)
        epochs, offsets = np.divmod(positions, self.instances_per_epoch)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self.permutation(int(epoch))[offsets[chosen]]
        return out

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step (rank_batch_size / micro_batch_size of them)."""
        step_start = self.epoch * self.instances_per_epoch + self.position
        indices = self._instances(step_start + self.rank * self.rank_batch_size, self.rank_batch_size)
        self.epoch, self.position = divmod(step_start + self.global_batch_size, self.instances_per_epoch)
        return [_make_batch(self.split, indices[i : i + self.micro_batch_size], self.seq_len, self.document_masking)
                for i in range(0, self.rank_batch_size, self.micro_batch_size)]

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        """Where the order stands, plus what must match to resume it (seed, seq_len, split, its size)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "split": self.split.name, "instances_per_epoch": self.instances_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the step at which `state` was taken (world size and batch size may differ)."""
        expected = {"seed": self.seed, "seq_len": self.seq_len, "split": self.split.name,
                    "instances_per_epoch": self.instances_per_epoch}
        mismatched = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
        if mismatched:
            raise ValueError(f"cannot resume this loader from the given state: {mismatched} (saved, current) differ; "
                             "resume with the same dataset, seed and seq_len")
        if not 0 <= state["position"] < self.instances_per_epoch or state["epoch"] < 0:
            raise ValueError(f"state epoch={state['epoch']} position={state['position']} is out of range "
                             f"(position must be in [0, {self.instances_per_epoch}))")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class EvalLoader:
    """Evaluation batches in a fixed order, over all instances of a split or a spread-out subset.

    Args:
        dataset: a TokenDataset or the path of a prepared dataset directory.
        seq_len, batch_size: instance length and rows per batch (the last batch may be smaller).
        split: "val" (default) or "train".
        max_instances: evaluate only this many instances, spread evenly over the split
            (instance floor(k * n / max_instances) for k < max_instances), so that a partial
            evaluation still samples every part of the split; None: all n instances.
        rank, world_size: rank r takes every world_size-th selected instance, starting at r;
            sum losses and token counts over ranks to get the whole evaluation.
        document_masking: also return doc_ids.
    """

    def __init__(
        self,
        dataset: TokenDataset | str | Path,
        *,
        seq_len: int,
        batch_size: int,
        split: str = "val",
        max_instances: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        document_masking: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances={max_instances} must be >= 1 (or None for all)")
        self.dataset, self.split = _open_split(dataset, split)
        available = self.split.check_instances(seq_len)
        if max_instances is None or max_instances >= available:
            selected = np.arange(available, dtype=np.int64)
        else:
            selected = np.arange(max_instances, dtype=np.int64) * available // max_instances
        self.num_instances = len(selected)
        self.indices = selected[rank::world_size]
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.document_masking = document_masking

    def __len__(self) -> int:
        """Batches this rank yields."""
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for i in range(0, len(self.indices), self.batch_size):
            yield _make_batch(self.split, self.indices[i : i + self.batch_size], self.seq_len, self.document_masking)
