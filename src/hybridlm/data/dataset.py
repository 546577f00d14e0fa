"""Reading a prepared dataset directory (see prepare.py for its layout).

    dataset = TokenDataset("data/stdlib")
    train = dataset.split("train")
    train.read(0, 10)               # the first 10 token ids of the train stream, as a numpy array
    train.num_instances(seq_len)    # how many training windows of seq_len + 1 tokens it holds
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from hybridlm.data.prepare import FORMAT, FORMAT_VERSION, PREPARE_HINT, SPLITS
from hybridlm.data.tokenizer import Tokenizer


class TokenSplit:
    """One split ("train" or "val"): its shards read as one concatenated token stream (numpy memmaps)."""

    def __init__(self, root: Path, name: str, info: dict, dtype: np.dtype, eos_id: int):
        self.root = root
        self.name = name
        self.dtype = dtype
        self.eos_id = eos_id
        self.n_tokens: int = info["n_tokens"]
        self.n_documents: int = info["n_documents"]
        self.n_bytes: int = info["n_bytes"]
        self._documents_path = root / info["documents"]
        self._shard_paths = [root / shard["tokens"] for shard in info["shards"]]
        shard_tokens = np.array([shard["n_tokens"] for shard in info["shards"]], dtype=np.int64)
        # shard k covers stream positions [shard_starts[k], shard_starts[k + 1]).
        self._shard_starts = np.concatenate([[0], np.cumsum(shard_tokens)])
        for path, n_tokens in zip(self._shard_paths, shard_tokens):
            expected = int(n_tokens) * dtype.itemsize
            size = path.stat().st_size if path.is_file() else None
            if size != expected:
                raise ValueError(f"shard {path} is {'missing' if size is None else f'{size} bytes'}, expected "
                                 f"{expected} bytes: the dataset at {root} is incomplete; {PREPARE_HINT} again")
        self._memmaps: dict[int, np.memmap] = {}

    def _shard(self, k: int) -> np.memmap:
        if k not in self._memmaps:
            self._memmaps[k] = np.memmap(self._shard_paths[k], dtype=self.dtype, mode="r")
        return self._memmaps[k]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream, as a new array of the on-disk dtype."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) are outside split {self.name!r} "
                             f"of {self.n_tokens} tokens")
        out = np.empty(length, dtype=self.dtype)
        filled = 0
        k = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self._shard_starts[k])
            take = min(length - filled, int(self._shard_starts[k + 1]) - start - filled)
            out[filled : filled + take] = self._shard(k)[offset : offset + take]
            filled += take
            k += 1
        return out

    def num_instances(self, seq_len: int) -> int:
        """Windows of seq_len + 1 tokens starting at multiples of seq_len: (n_tokens - 1) // seq_len."""
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        return max(self.n_tokens - 1, 0) // seq_len

    def check_instances(self, seq_len: int) -> int:
        """num_instances(seq_len), raising a clear error when it is 0."""
        count = self.num_instances(seq_len)
        if count == 0:
            raise ValueError(
                f"split {self.name!r} of {self.root} has {self.n_tokens} tokens ({self.n_documents} documents), "
                f"too few for one instance of seq_len={seq_len} (needs at least {seq_len + 1} tokens): "
                "lower the sequence length, or prepare more data (or a larger --val-fraction for the val split); "
                f"{PREPARE_HINT}"
            )
        return count

    def instance(self, index: int, seq_len: int) -> np.ndarray:
        """Window `index`: tokens [index * seq_len, index * seq_len + seq_len + 1); inputs = [:-1], labels = [1:]."""
        if not 0 <= index < self.num_instances(seq_len):
            raise IndexError(f"instance {index} is outside split {self.name!r} ({self.num_instances(seq_len)} "
                             f"instances of seq_len={seq_len})")
        return self.read(index * seq_len, seq_len + 1)

    def document_starts(self) -> np.ndarray:
        """int64 [n_documents]: where each document starts in the split's stream (documents end with EOS)."""
        return np.load(self._documents_path, mmap_mode="r")

    def __repr__(self) -> str:
        return (f"TokenSplit({self.name!r}, n_tokens={self.n_tokens}, n_documents={self.n_documents}, "
                f"shards={len(self._shard_paths)})")


class TokenDataset:
    """A dataset directory written by `hybridlm data prepare` (or ensure_embedded_dataset)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise FileNotFoundError(f"no dataset directory at {self.path}: expected a directory with meta.json; "
                                    f"{PREPARE_HINT}")
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path} has no meta.json, so it is not a prepared dataset (or its preparation did not finish): "
                f"{PREPARE_HINT} (re-running it with the same arguments completes an interrupted preparation)"
            )
        self.meta: dict = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path} has format {self.meta.get('format')!r} version "
                             f"{self.meta.get('format_version')}, expected {FORMAT!r} version {FORMAT_VERSION}; "
                             "prepare the data again with this hybridlm")
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]
        self.dtype = np.dtype(self.meta["dtype"])
        self.tokenizer_path = self.path / self.meta["tokenizer"]["path"]
        self._splits: dict[str, TokenSplit] = {}

    def split(self, name: str) -> TokenSplit:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: expected one of {SPLITS}")
        if name not in self._splits:
            info = self.meta["splits"][name]
            if info["n_tokens"] == 0:
                raise ValueError(f"split {name!r} of {self.path} is empty: the sources had no documents for it; "
                                 f"{PREPARE_HINT} with more documents")
            self._splits[name] = TokenSplit(self.path, name, info, self.dtype, self.eos_id)
        return self._splits[name]

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the dataset was prepared with (its copy inside the dataset directory)."""
        return Tokenizer(self.tokenizer_path, eos_token=self.eos_id)

    def __repr__(self) -> str:
        splits = ", ".join(f"{name}={self.meta['splits'][name]['n_tokens']} tokens" for name in SPLITS)
        return f"TokenDataset({str(self.path)!r}, vocab_size={self.vocab_size}, {splits})"
