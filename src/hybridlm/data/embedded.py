"""The embedded default corpus: the Python standard library's own source files.

Real text that exists wherever Python runs, so training works with no data given. The corpus is
every *.py file under `sysconfig.get_paths()["stdlib"]` (tests included; installed packages in
site-packages / dist-packages excluded), each file one document, held out by file. A byte-level
BPE tokenizer (8192 tokens by default) is trained on the training files only, then the files are
tokenized with it. The result is cached under $HYBRIDLM_CACHE (default ~/.cache/hybridlm) in a
directory named after the Python version and a hash of the file list and settings, so later
calls return at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

from hybridlm.data.prepare import (
    FORMAT_VERSION,
    file_lock,
    find_forced_held_out_key,
    is_held_out,
    prepare_dataset,
)
from hybridlm.data.sources import collect_pieces, iter_documents
from hybridlm.data.tokenizer import train_bpe_tokenizer

EMBEDDED_VOCAB_SIZE = 8192
# About 36 of the ~1,800 files (~200k tokens): enough for a steady validation loss.
EMBEDDED_VAL_FRACTION = 0.02
EMBEDDED_SHARD_BYTES = 2 << 20  # ~15 units for ~30 MB, so every core has work
EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")


def cache_root() -> Path:
    return Path(os.environ.get("HYBRIDLM_CACHE") or Path.home() / ".cache" / "hybridlm").expanduser()


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def embedded_pieces(max_files: int | None = None) -> list:
    """The stdlib source files as pieces; with max_files, an evenly spread subset of that many (for quick tests)."""
    pieces = collect_pieces([stdlib_root()], text_suffixes=(".py",), exclude_dirs=EXCLUDED_DIRS)
    if max_files is not None and max_files < len(pieces):
        pieces = [pieces[k * len(pieces) // max_files] for k in range(max_files)]
    return pieces


def ensure_embedded_dataset(
    cache_dir: str | Path | None = None,
    *,
    vocab_size: int = EMBEDDED_VOCAB_SIZE,
    max_files: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """The embedded dataset's directory, preparing it first if it is not cached yet.

    Args:
        cache_dir: where datasets are cached (default $HYBRIDLM_CACHE or ~/.cache/hybridlm).
        vocab_size: size of the BPE vocabulary trained on the corpus.
        max_files: use only this many stdlib files (evenly spread); None = all (the default corpus).
        workers: tokenizing processes (default: all cores available).
        progress: report progress on stderr.

    Returns:
        A prepared dataset directory (open it with TokenDataset); its meta.json names its tokenizer.json.
    Safe to call from several processes at once: they wait for one another, and only the first prepares.
    """
    pieces = embedded_pieces(max_files)
    if not pieces:
        raise FileNotFoundError(f"found no *.py files under the standard library at {stdlib_root()}: "
                                "pass a dataset instead")
    fingerprint = json.dumps([FORMAT_VERSION, sys.version, str(stdlib_root()), vocab_size, EMBEDDED_VAL_FRACTION,
                              [(p.key, p.size, p.mtime_ns) for p in pieces]])
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    out = root / f"embedded-py{sys.version_info.major}.{sys.version_info.minor}-{digest}"
    if (out / "meta.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f"{out.name}.lock"):
        if (out / "meta.json").is_file():  # another process prepared it while we waited
            return out
        if progress:
            print(f"preparing the embedded dataset ({len(pieces)} Python stdlib files) in {out}", file=sys.stderr)
        # Written atomically: if present, it is complete (an earlier run stopped after training it).
        tokenizer_path = out / "tokenizer.json"
        if not tokenizer_path.is_file():
            forced_key = find_forced_held_out_key(pieces, EMBEDDED_VAL_FRACTION)
            training_texts = (text for key, text in iter_documents(pieces)
                              if not is_held_out(key, EMBEDDED_VAL_FRACTION, forced_key))
            train_bpe_tokenizer(training_texts, vocab_size, tokenizer_path)
        keys = {piece.key for piece in pieces}
        prepare_dataset([stdlib_root()], tokenizer_path, out, val_fraction=EMBEDDED_VAL_FRACTION, workers=workers,
                        shard_bytes=EMBEDDED_SHARD_BYTES, text_suffixes=(".py",), exclude_dirs=EXCLUDED_DIRS,
                        select=keys.__contains__, progress=progress)
    return out
