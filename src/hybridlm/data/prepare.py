"""Tokenize text sources into token-id arrays on disk: `hybridlm data prepare`.

Layout of a prepared dataset directory:

    meta.json                  format version, tokenizer identity, vocab_size, eos_id, dtype, per-split totals
    tokenizer.json             a copy of the tokenizer used (meta.json["tokenizer"]["path"] points here)
    train/00000.bin            raw token ids (dtype from meta.json, native byte order), one file per shard;
    train/00000.docs.npy       int64 offsets of document starts inside that shard
    train/documents.npy        int64 [n_documents]: document starts in the split's whole stream
    val/...                    the same for the held-out split
    shards/00000.json          manifest of one work unit; its presence marks the unit's shards finished

The token stream of a split is its shards concatenated in order; each document is its tokens
followed by the EOS id. A document is held out (split "val") when blake2b-64(key) / 2**64 <
val_fraction, keys being stable document names (see sources.py). If no document falls below,
the one with the smallest hash is held out instead, so the held-out split is never empty.

Work is cut into units of about `shard_bytes` of source text. A unit is tokenized by one worker
process, streaming its documents in small batches, so memory is bounded by the unit's output
(one shard) rather than the corpus. Every file is written under a temporary name and renamed
into place; the unit's manifest is renamed last. A crash therefore leaves either a finished unit
(manifest present and consistent) or one that the next run redoes; re-running skips finished
units, and returns at once when meta.json already describes the same sources and settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hybridlm.data.sources import TEXT_SUFFIXES, Piece, collect_pieces, iter_documents
from hybridlm.data.tokenizer import Tokenizer, file_sha256

FORMAT = "hybridlm-token-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_VAL_FRACTION = 0.02
DEFAULT_SHARD_BYTES = 16 << 20
HELD_OUT_RULE = "blake2b-64(key) / 2**64 < val_fraction, else the smallest-hash document if none"
PREPARE_HINT = "run `hybridlm data prepare SOURCES... --tokenizer TOKENIZER --out DIR`"

# Documents are tokenized in batches of about this much text: large enough to amortize calls into
# `tokenizers`, small enough to keep a worker's memory flat.
_BATCH_CHARS = 1 << 20


def held_out_score(key: str) -> float:
    """A number in [0, 1) fixed by the document key alone (the same on every machine and Python version)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_held_out(key: str, val_fraction: float, forced_key: str | None = None) -> bool:
    return key == forced_key or held_out_score(key) < val_fraction


def find_forced_held_out_key(pieces: Sequence[Piece], val_fraction: float) -> str | None:
    """None when some document is held out by its hash; otherwise the key of the smallest-hash document.

    Stops reading at the first document held out by its hash, so on any corpus of more than a
    few hundred documents this reads only a handful of them.
    """
    best_key, best_score = None, 2.0
    for key, _ in iter_documents(pieces):
        score = held_out_score(key)
        if score < val_fraction:
            return None
        if score < best_score:
            best_key, best_score = key, score
    if best_key is None:
        raise ValueError("the sources hold no non-empty document: expected text files or JSONL/Parquet records "
                         "with text")
    return best_key


def plan_units(pieces: Sequence[Piece], shard_bytes: int) -> list[list[Piece]]:
    """Group consecutive pieces into units of at least `shard_bytes` source bytes (the last may be smaller)."""
    units: list[list[Piece]] = [[]]
    size = 0
    for piece in pieces:
        if size >= shard_bytes:
            units.append([])
            size = 0
        units[-1].append(piece)
        size += piece.size
    return [unit for unit in units if unit]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _write_atomically(path: Path, write) -> None:
    """Call write(file) on a temporary sibling of `path`, flush it to disk, then rename it to `path`."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _write_json(path: Path, value: dict) -> None:
    _write_atomically(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode("utf-8")))


class _ShardWriter:
    """Appends documents (ids + EOS) of one split of one unit to a temporary token file."""

    def __init__(self, directory: Path, unit_index: int, dtype: np.dtype):
        self.tokens_path = directory / f"{unit_index:05d}.bin"
        self.documents_path = directory / f"{unit_index:05d}.docs.npy"
        self.temporary = self.tokens_path.with_name(f"{self.tokens_path.name}.tmp-{os.getpid()}")
        self.dtype = dtype
        self.file = None
        self.document_starts: list[int] = []
        self.n_tokens = 0
        self.n_bytes = 0

    def add(self, documents: list[list[int]], texts: list[str], eos_id: int) -> None:
        if self.file is None:
            self.tokens_path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.temporary, "wb")
        lengths = np.array([len(ids) + 1 for ids in documents], dtype=np.int64)
        starts = self.n_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.document_starts.extend(starts.tolist())
        tokens = np.full(int(lengths.sum()), eos_id, dtype=self.dtype)
        for start, ids in zip(starts - self.n_tokens, documents):
            tokens[start : start + len(ids)] = ids
        tokens.tofile(self.file)
        self.n_tokens += len(tokens)
        self.n_bytes += sum(len(text.encode("utf-8")) for text in texts)

    def finish(self, out: Path) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temporary, self.tokens_path)
        _write_atomically(self.documents_path, lambda f: np.save(f, np.array(self.document_starts, dtype=np.int64)))
        return {"tokens": self.tokens_path.relative_to(out).as_posix(),
                "documents": self.documents_path.relative_to(out).as_posix(),
                "n_tokens": self.n_tokens, "n_documents": len(self.document_starts), "n_bytes": self.n_bytes}


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str, eos_id: int) -> None:
    global _worker_tokenizer
    # One process per core already; threads inside `tokenizers` would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer(tokenizer_path, eos_token=eos_id)


def _prepare_unit_in_worker(task: tuple) -> int:
    return _prepare_unit(task, _worker_tokenizer)


def _prepare_unit(task: tuple, tokenizer: Tokenizer) -> int:
    """Tokenize one unit into its shards and write its manifest. Returns the unit's source bytes."""
    out, unit_index, pieces, settings = task
    dtype = np.dtype(settings["dtype"])
    writers = {split: _ShardWriter(out / split, unit_index, dtype) for split in SPLITS}
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        for split in SPLITS:
            texts = [text for s, text in batch if s == split]
            if texts:
                writers[split].add(tokenizer.encode_batch(texts), texts, settings["eos_id"])
        batch.clear()

    chars = 0
    for key, text in iter_documents(pieces):
        held_out = is_held_out(key, settings["val_fraction"], settings["forced_held_out_key"])
        batch.append(("val" if held_out else "train", text))
        chars += len(text)
        if chars >= _BATCH_CHARS:
            flush()
            chars = 0
    flush()
    shards = {split: writer.finish(out) for split, writer in writers.items() if writer.file is not None}
    manifest = {"unit": unit_index, "pieces": [piece.describe() for piece in pieces], "settings": settings,
                "shards": shards}
    _write_json(out / "shards" / f"{unit_index:05d}.json", manifest)
    return sum(piece.size for piece in pieces)


def _finished_manifest(out: Path, unit_index: int, pieces: list[Piece], settings: dict) -> dict | None:
    """The unit's manifest if the unit is finished with these pieces and settings, else None."""
    path = out / "shards" / f"{unit_index:05d}.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("pieces") != [piece.describe() for piece in pieces] or manifest.get("settings") != settings:
        return None
    itemsize = np.dtype(settings["dtype"]).itemsize
    for shard in manifest["shards"].values():
        tokens, documents = out / shard["tokens"], out / shard["documents"]
        if not documents.is_file() or not tokens.is_file() or tokens.stat().st_size != shard["n_tokens"] * itemsize:
            return None
    return manifest


@contextlib.contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on `path` (created if needed) for the duration of the block.

    Serializes preparations of one directory, e.g. when every rank of a job calls prepare at once.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; concurrent runs still only ever rename whole files into place
        yield
        return
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_complete(out: Path, meta: dict) -> bool:
    """Whether every file meta.json names is present with its expected size (cheap: no reading)."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in meta["splits"].values():
        if split["n_documents"] and not (out / split["documents"]).is_file():
            return False
        for shard in split["shards"]:
            path = out / shard["tokens"]
            if not path.is_file() or path.stat().st_size != shard["n_tokens"] * itemsize:
                return False
    return True


def _remove_unreferenced(out: Path, referenced: set[str]) -> None:
    """Delete shard files and temporaries left by crashed or differently planned earlier runs."""
    for directory in (*SPLITS, "shards"):
        for path in (out / directory).glob("*"):
            relative = path.relative_to(out).as_posix()
            if path.is_file() and relative not in referenced:
                path.unlink()


def _finalize(out: Path, manifests: list[dict]) -> dict:
    splits, referenced = {}, set()
    for split in SPLITS:
        shards = [manifest["shards"][split] for manifest in manifests if split in manifest["shards"]]
        referenced.update(name for shard in shards for name in (shard["tokens"], shard["documents"]))
        n_documents = sum(shard["n_documents"] for shard in shards)
        documents_path = out / split / "documents.npy"
        referenced.add(documents_path.relative_to(out).as_posix())
        if n_documents:
            temporary = documents_path.with_name(f"documents.tmp-{os.getpid()}.npy")
            index = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.int64, shape=(n_documents,))
            document, token = 0, 0
            for shard in shards:
                starts = np.load(out / shard["documents"])
                index[document : document + len(starts)] = starts + token
                document += len(starts)
                token += shard["n_tokens"]
            index.flush()
            del index
            os.replace(temporary, documents_path)
        splits[split] = {
            "n_tokens": sum(shard["n_tokens"] for shard in shards),
            "n_documents": n_documents,
            "n_bytes": sum(shard["n_bytes"] for shard in shards),
            "documents": documents_path.relative_to(out).as_posix(),
            "shards": [{key: shard[key] for key in ("tokens", "n_tokens", "n_documents", "n_bytes")}
                       for shard in shards],
        }
    referenced.update(f"shards/{manifest['unit']:05d}.json" for manifest in manifests)
    _remove_unreferenced(out, referenced)
    return splits


def prepare_dataset(
    sources: Sequence[str | Path],
    tokenizer: str | Path,
    out: str | Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    workers: int | None = None,
    eos_token: str | int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    text_suffixes: Sequence[str] = TEXT_SUFFIXES,
    exclude_dirs: Sequence[str] = (),
    select: Callable[[str], bool] | None = None,
    progress: bool = True,
) -> Path:
    """Tokenize `sources` with `tokenizer` into a dataset directory `out`; returns `out`.

    Args:
        sources: directories (searched recursively for `text_suffixes`, .jsonl and .parquet files),
            text files, JSONL files (field `text`) or Parquet files (column `text`, needs pyarrow).
        tokenizer: a Hugging Face tokenizer.json (or a folder holding one); copied into `out`.
        out: the dataset directory (created if needed).
        val_fraction: expected fraction of documents held out (split "val"); at least one always is.
        workers: processes tokenizing in parallel (default: the cores this process may use).
        eos_token: the token (string or id) appended after each document; default: found by name.
        shard_bytes: source bytes per work unit (and so per shard).
        text_suffixes: file suffixes read as whole documents when searching directories.
        exclude_dirs: directory names skipped when searching directories.
        select: when given, a directory's file is read only if select(its relative path) is true.
        progress: show a progress bar (tqdm, on stderr).

    Memory stays bounded by one shard per worker, except that a single document (a whole text
    file, one JSONL line, one Parquet row group) is held in memory at once.

    Raises:
        FileNotFoundError / ValueError: missing sources, no documents, malformed JSONL, a corpus
            too small to split, or an `out` already prepared with another tokenizer or split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1): it is the share of documents held out")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes={shard_bytes} must be positive")
    out = Path(out).expanduser()
    tok = Tokenizer(tokenizer, eos_token=eos_token)
    dtype = token_dtype(tok.vocab_size)
    pieces = collect_pieces(sources, piece_bytes=shard_bytes, text_suffixes=text_suffixes, exclude_dirs=exclude_dirs,
                            select=select)
    if not pieces:
        raise ValueError(f"found no documents in {[str(s) for s in sources]}: expected files ending in "
                         f"{', '.join(text_suffixes)}, .jsonl or .parquet")
    units = plan_units(pieces, shard_bytes)
    plan_sha256 = hashlib.sha256(json.dumps([[p.describe() for p in unit] for unit in units]).encode()).hexdigest()
    requested = {"format_version": FORMAT_VERSION, "tokenizer_sha256": tok.sha256, "eos_id": tok.eos_token_id,
                 "dtype": dtype.name, "val_fraction": val_fraction}

    out.mkdir(parents=True, exist_ok=True)
    with file_lock(out / ".lock"):
        meta_path = out / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            previous = {key: meta.get("settings", {}).get(key) for key in requested}
            if previous != requested:
                changed = {key: (previous[key], requested[key]) for key in requested if previous[key] != requested[key]}
                raise ValueError(f"{out} already holds a dataset prepared with other settings {changed} (old, new): "
                                 "choose another --out, or delete that directory to prepare it again")
            if meta.get("plan_sha256") == plan_sha256 and _is_complete(out, meta):
                return out
            # The sources changed or files went missing: the old description must not outlive the update.
            meta_path.unlink()

        forced_key = find_forced_held_out_key(pieces, val_fraction)
        settings = {**requested, "forced_held_out_key": forced_key}
        tokenizer_copy = out / "tokenizer.json"
        if not tokenizer_copy.is_file() or file_sha256(tokenizer_copy) != tok.sha256:
            _write_atomically(tokenizer_copy, lambda f: f.write(tok.path.read_bytes()))
        for directory in (*SPLITS, "shards"):
            (out / directory).mkdir(exist_ok=True)

        pending = [(out, index, unit, settings) for index, unit in enumerate(units)
                   if _finished_manifest(out, index, unit, settings) is None]
        pending.sort(key=lambda task: -sum(piece.size for piece in task[2]))  # largest first balances the workers
        _run_units(pending, tok, workers or default_workers(), progress)

        manifests = []
        for index, unit in enumerate(units):
            manifest = _finished_manifest(out, index, unit, settings)
            if manifest is None:
                raise RuntimeError(f"unit {index} of {out} did not finish; run the same command again to complete it")
            manifests.append(manifest)
        splits = _finalize(out, manifests)
        if splits["train"]["n_documents"] == 0:
            raise ValueError(f"every document of the sources was held out ({splits['val']['n_documents']} documents): "
                             "give more documents (at least 2) or a smaller --val-fraction")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokenizer": {"path": "tokenizer.json", "source": str(tok.path.resolve()), "sha256": tok.sha256,
                          "eos_token": tok.eos_token, "byte_level": tok.is_byte_level},
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_token_id,
            "dtype": dtype.name,
            "byte_order": "little" if np.little_endian else "big",
            "val_fraction": val_fraction,
            "held_out_rule": HELD_OUT_RULE,
            "forced_held_out_key": forced_key,
            "sources": [str(Path(source).expanduser().resolve()) for source in sources],
            "shard_bytes": shard_bytes,
            "plan_sha256": plan_sha256,
            "settings": settings,
            "splits": splits,
        }
        _write_json(meta_path, meta)
    return out


def _run_units(tasks: list[tuple], tokenizer: Tokenizer, workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    total = sum(piece.size for task in tasks for piece in task[2])
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not progress or not tasks) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                bar.update(_prepare_unit(task, tokenizer))
            return
        # fork: workers start at once and inherit the imported modules; spawn where fork is missing.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with context.Pool(min(workers, len(tasks)), initializer=_init_worker,
                          initargs=(str(tokenizer.path), tokenizer.eos_token_id)) as pool:
            for done_bytes in pool.imap_unordered(_prepare_unit_in_worker, tasks, chunksize=1):
                bar.update(done_bytes)
